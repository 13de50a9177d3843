"""Fold the adapter into the base weights (PEFT's merge_and_unload) and save a plain HF folder.

The folder loads with `from_pretrained` alone: config.json (with id2label for a classifier), safetensors
weights, generation config, tokenizer. It is both `--format merged`'s output and the ONNX exporter's input;
an int8 / int4 export writes the same files but its weights (`save_model_files`, then adapters.quantized).
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
    _describe(model, labels)
    model.save_pretrained(dest, safe_serialization=True)
    tokenizer.save_pretrained(dest)


def save_model_files(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, labels: tuple[str, ...],
                     dest: Path) -> None:
    """What `save_merged` writes but the weights: config.json (the model's own class as its architecture,
    so a loader builds the same state-dict keys), generation_config.json for a generating model, the tokenizer."""
    _describe(model, labels)
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(dest)
    if model.can_generate() and model.generation_config is not None:
        model.generation_config.save_pretrained(dest)
    tokenizer.save_pretrained(dest)


def _describe(model: PreTrainedModel, labels: tuple[str, ...]) -> None:
    """The config a saved folder carries: the labels by name, and no path of this machine."""
    if labels:
        model.config.id2label = dict(enumerate(labels))
        model.config.label2id = {label: i for i, label in enumerate(labels)}
    model.config.name_or_path = ""
