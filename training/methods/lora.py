"""LoRA (with PEFT's rsLoRA and DoRA switches): low-rank A, B beside each target linear, base frozen."""

from __future__ import annotations

from peft import LoraConfig, PeftModel
from torch import nn
from transformers import PreTrainedModel

from training.config import TrainConfig
from training.errors import ConfigError
from training.methods.peft_io import linear_names, matches, task_type, wrap

DECODER_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")  # Llama-style attention projections
ENCODER_TARGETS = ("query", "key", "value", "dense")  # BERT-style attention + feed-forward linears


def default_targets(model: nn.Module) -> tuple[str, ...]:
    """The LoRA targets to use when none are given, picked by the linear layers the model has."""
    leaf_names = {name.rsplit(".", 1)[-1] for name in linear_names(model)}
    for targets in (DECODER_TARGETS, ENCODER_TARGETS):
        if set(targets) <= leaf_names:
            return targets
    raise ConfigError(
        f"no default LoRA targets for this architecture; pass --target-modules (linear layers: {sorted(leaf_names)})"
    )


def check_linear_targets(model: nn.Module, targets: tuple[str, ...], base_name: str) -> None:
    names = linear_names(model)
    missing = [t for t in targets if not any(matches(n, t) for n in names)]
    if missing:
        leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
        raise ConfigError(f"target modules {missing} are not linear layers of {base_name!r}; it has {leaves}")


def lora_config(config: TrainConfig, task: str) -> LoraConfig:
    return LoraConfig(
        r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
        target_modules=list(config.target_modules), bias="none", task_type=task_type(task),
        use_rslora=config.use_rslora, use_dora=config.use_dora,
    )


def prepare(model: PreTrainedModel, config: TrainConfig, task: str, base_name: str) -> PeftModel:
    """Trainable LoRA on config.target_modules; for classification TaskType.SEQ_CLS also trains and saves
    the head (PEFT's modules_to_save), which is where the server finds it."""
    check_linear_targets(model, config.target_modules, base_name)
    return wrap(model, lora_config(config, task), base_name)
