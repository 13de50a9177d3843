"""Load a prepared base for a task (fp32, CPU) and wrap it with PEFT LoRA.

Why fp32: on CPU it is the fast dtype, and the server's CPU default is fp32 too, so what training
measures is what serving computes.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from torch import nn
from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer,
                          PreTrainedModel, PreTrainedTokenizerBase)

from adapters import PreparedBase
from training.config import TrainConfig
from training.errors import ConfigError

DECODER_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")  # Llama-style attention projections
ENCODER_TARGETS = ("query", "key", "value", "dense")  # BERT-style attention + feed-forward linears
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


def default_target_modules(model: nn.Module) -> tuple[str, ...]:
    """The LoRA targets to use when none are given, picked by the linear layers the model has."""
    leaf_names = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    for targets in (DECODER_TARGETS, ENCODER_TARGETS):
        if set(targets) <= leaf_names:
            return targets
    raise ConfigError(
        f"no default LoRA targets for this architecture; pass --target-modules (linear layers: {sorted(leaf_names)})"
    )


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


def add_lora(model: PreTrainedModel, config: TrainConfig, task: str, base_name: str) -> PeftModel:
    """Wrap `model` with trainable LoRA on config.target_modules (base weights frozen).

    For classification, TaskType.SEQ_CLS also trains and saves the head (PEFT's modules_to_save), which is
    where the server finds it. base_model_name_or_path is set to the base's name, not this machine's path.
    """
    present = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    missing = [t for t in config.target_modules if t not in present]
    if missing:
        raise ConfigError(f"target modules {missing} are not linear layers of {base_name!r}; it has {sorted(present)}")
    lora = LoraConfig(
        r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
        target_modules=list(config.target_modules), bias="none",
        task_type=TaskType.SEQ_CLS if task == "classification" else TaskType.CAUSAL_LM,
    )
    peft_model = get_peft_model(model, lora)
    peft_model.peft_config["default"].base_model_name_or_path = base_name
    return peft_model


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]
