"""Load a prepared base for a task (fp32, CPU) and make it trainable by the configured method.

Why fp32: on CPU it is the fast dtype, and the server's CPU default is fp32 too, so what training
measures is what serving computes. On a GPU the fp32 weights are the master weights that bf16 autocast
computes from. Why the CPU: the method wraps the model there, then training.methods moves it to the run's
device (training.device), QLoRA's base quantized on the way.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn
from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer,
                          PreTrainedModel, PreTrainedTokenizerBase)

from adapters import PreparedBase
from training import methods
from training.config import TrainConfig
from training.errors import ConfigError

CAUSAL_ARCHITECTURE_SUFFIXES = ("ForCausalLM", "LMHeadModel")
DTYPE = torch.float32


def default_task(base: PreparedBase) -> str:
    """completion for causal LMs (smollm2-135m), classification for encoders (minilm-l6)."""
    return "completion" if is_causal_lm(base.path) else "classification"


def is_causal_lm(path: Path) -> bool:
    """Whether config.json names a causal-LM architecture (a decoder we can do completion on)."""
    config = json.loads((Path(path) / "config.json").read_text())
    architectures = config.get("architectures") or []
    return any(a.endswith(CAUSAL_ARCHITECTURE_SUFFIXES) for a in architectures)


def default_target_modules(model: nn.Module, method: str = "lora") -> tuple[str, ...]:
    """The modules `method` wraps when --target-modules is not given (training.methods decides)."""
    return methods.default_target_modules(model, method)


def prepare_model(model: PreTrainedModel, config: TrainConfig, task: str, base_name: str) -> nn.Module:
    """`model` made trainable by config.method: see training.methods (the method table)."""
    return methods.prepare_model(model, config, task, base_name)


def load_tokenizer(path: Path) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(base: PreparedBase) -> PreTrainedModel:
    if not is_causal_lm(base.path):
        raise ConfigError(f"completion needs a causal LM base; {base.name!r} is not one (try --task classification)")
    return AutoModelForCausalLM.from_pretrained(base.path, dtype=DTYPE)


def load_sequence_classifier(base: PreparedBase, labels: tuple[str, ...], pad_token_id: int) -> PreTrainedModel:
    """The base with a fresh linear head of len(labels) outputs (initialised from torch's RNG: seed first)."""
    return AutoModelForSequenceClassification.from_pretrained(
        base.path, dtype=DTYPE, num_labels=len(labels), pad_token_id=pad_token_id,
        id2label=dict(enumerate(labels)), label2id={label: i for i, label in enumerate(labels)},
    )


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]
