"""Fold the adapter into the base weights (PEFT's merge_and_unload) and save a plain HF folder.

The folder loads with `from_pretrained` alone: config.json (with id2label for a classifier), safetensors
weights, generation config, tokenizer. It is both `--format merged`'s output and the ONNX exporter's input.
"""

from __future__ import annotations

from pathlib import Path

from peft import PeftModel
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase


def merge(model: nn.Module) -> PreTrainedModel:
    """The task model with the adapter folded into its weights (and the head kept). Consumes `model`.

    A PEFT model is merged by PEFT (LoRA and DoRA: W + delta; IA3: W scaled by its vector); a freeze or
    full model (training.trained_folder.task_model) is already a plain HF model with its trained weights.
    """
    if isinstance(model, PeftModel):
        return model.merge_and_unload(safe_merge=True).eval()
    return model.eval()


def save_merged(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, labels: tuple[str, ...], dest: Path) -> None:
    if labels:
        model.config.id2label = dict(enumerate(labels))
        model.config.label2id = {label: i for i, label in enumerate(labels)}
    model.config.name_or_path = ""  # not this machine's path
    model.save_pretrained(dest, safe_serialization=True)
    tokenizer.save_pretrained(dest)
