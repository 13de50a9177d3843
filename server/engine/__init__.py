"""The model side of the server: base loading, per-request LoRA, generation, classification."""
