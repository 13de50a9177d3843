"""Fold the adapter into the base weights (PEFT's merge_and_unload) and save a plain HF folder.

The folder loads with `from_pretrained` alone: config.json (with id2label for a classifier), safetensors
weights, generation config, tokenizer. It is both `--format merged`'s output and the ONNX exporter's input.
"""

from __future__ import annotations

from pathlib import Path

from peft import PeftModel
from transformers import PreTrainedModel, PreTrainedTokenizerBase


def merge(model: PeftModel) -> PreTrainedModel:
    """The task model with every LoRA delta added to its base weight (and the head kept). Consumes `model`."""
    return model.merge_and_unload(safe_merge=True).eval()


def save_merged(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, labels: tuple[str, ...], dest: Path) -> None:
    if labels:
        model.config.id2label = dict(enumerate(labels))
        model.config.label2id = {label: i for i, label in enumerate(labels)}
    model.config.name_or_path = ""  # not this machine's path
    model.save_pretrained(dest, safe_serialization=True)
    tokenizer.save_pretrained(dest)
