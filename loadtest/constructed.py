"""Constructed LoRA adapters for a Llama-shaped base: stock PEFT folders with seeded random weights.

The load run needs more adapters than the examples ship, and adapters whose greedy answers differ
from each other (so that a probe's text tells which version served it). PEFT initialises B to zero,
which changes nothing; here B is drawn with a chosen standard deviation instead, as
tests/integration/conftest.py's `random_completion_adapter` does: 0.2 on q_proj and v_proj of every
layer moves SmolLM2's greedy output well away from the base's. The folders are written with numpy
and safetensors (no model load), shapes read from the base's config.json.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

TARGETS = ("q_proj", "v_proj")
RANK = 8
ALPHA = 16


def module_shapes(base_dir: Path) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each target projection, from a Llama config."""
    config = json.loads((Path(base_dir) / "config.json").read_text())
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    kv_heads = config.get("num_key_value_heads") or heads
    return {"q_proj": (hidden, heads * head_dim), "v_proj": (hidden, kv_heads * head_dim)}


def write_random_lora(base_dir: Path, out: Path, seed: int, b_std: float, base_name: str) -> Path:
    """A rank-8 LoRA on q_proj and v_proj of every layer: A uniform in +-1/sqrt(in) (PEFT's kaiming
    bound), B normal(0, b_std)."""
    config = json.loads((Path(base_dir) / "config.json").read_text())
    shapes, rng = module_shapes(base_dir), np.random.default_rng(seed)
    tensors = {}
    for layer in range(config["num_hidden_layers"]):
        for module in TARGETS:
            fan_in, fan_out = shapes[module]
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            bound = 1.0 / np.sqrt(fan_in)
            tensors[f"{prefix}.lora_A.weight"] = rng.uniform(-bound, bound, (RANK, fan_in)).astype(np.float32)
            tensors[f"{prefix}.lora_B.weight"] = rng.normal(0.0, b_std, (fan_out, RANK)).astype(np.float32)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    (out / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_name, "r": RANK,
        "lora_alpha": ALPHA, "lora_dropout": 0.0, "target_modules": list(TARGETS), "bias": "none",
        "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "inference_mode": True,
    }, indent=1))
    return out
