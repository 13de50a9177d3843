"""Helpers for the adapter tests: real PEFT `save_pretrained` folders on the tiny bases, damaged copies."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable

import torch
from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

TINY_LORA = {"task_type": TaskType.CAUSAL_LM, "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}
B_STD = 0.5  # PEFT's random B is tiny on a 64-wide model; a visible delta makes the equivalence tests bite
NUM_LABELS = 3


def make_peft_model(base_dir: Path, seed: int = 0, **config) -> PeftModel:
    """A PEFT LoRA model on the tiny Llama with random, non-zero A and B."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    peft_model = get_peft_model(model, LoraConfig(**{**TINY_LORA, **config}, init_lora_weights=False))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, B_STD)
    return peft_model.eval()


def save_peft_adapter(base_dir: Path, out: Path, seed: int = 0, **config) -> Path:
    """Stock PEFT `save_pretrained` output (no manifest), as a user would hand it to us."""
    make_peft_model(base_dir, seed, **config).save_pretrained(out)
    return out


def save_classifier_adapter(base_dir: Path, out: Path) -> PeftModel:
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=NUM_LABELS)
    config = LoraConfig(task_type=TaskType.SEQ_CLS, r=4, lora_alpha=8, target_modules=["query", "value"],
                        init_lora_weights=False)
    peft_model = get_peft_model(model, config)
    peft_model.save_pretrained(out)
    return peft_model


def copy_folder(folder: Path, dest: Path) -> Path:
    shutil.copytree(folder, dest)
    return dest


def edit_tensors(folder: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
    """Load the folder's safetensors, let `edit` change the dict in place, and write it back."""
    path = folder / "adapter_model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})
