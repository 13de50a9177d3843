"""What every PEFT-based method shares: the task type, wrapping, writing and reading PEFT folders."""

from __future__ import annotations

from pathlib import Path

import torch
from peft import PeftConfig, PeftModel, TaskType, get_peft_model
from torch import nn
from transformers import PreTrainedModel

PEFT_MODEL_CARD = "README.md"  # PEFT's generated card: a template that names this machine's base path


def task_type(task: str) -> TaskType:
    """SEQ_CLS for classification (PEFT then trains and saves the head too), CAUSAL_LM otherwise."""
    return TaskType.SEQ_CLS if task == "classification" else TaskType.CAUSAL_LM


def wrap(model: PreTrainedModel, peft_config: PeftConfig, base_name: str) -> PeftModel:
    """get_peft_model, with base_model_name_or_path set to the base's name rather than this machine's path."""
    peft_model = get_peft_model(model, peft_config)
    peft_model.peft_config["default"].base_model_name_or_path = base_name
    return peft_model


def save_peft(model: nn.Module, folder: Path, base_path: Path) -> None:
    """PEFT's own files (adapter_config.json + adapter_model.safetensors), nothing fetched from a hub."""
    model.save_pretrained(folder, safe_serialization=True, save_embedding_layers=False)
    (folder / PEFT_MODEL_CARD).unlink(missing_ok=True)


def reload_peft(model: PreTrainedModel, folder: Path, device: torch.device | None = None) -> PeftModel:
    """The folder's PEFT weights on `model` (they go where the base's layers are; the caller moves the rest)."""
    return PeftModel.from_pretrained(model, str(folder))


def linear_names(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]


def matches(module_name: str, target: str) -> bool:
    """PEFT's rule for a list of target names: the full name, or a dotted suffix of it."""
    return module_name == target or module_name.endswith("." + target)
