"""IA3: a learned vector rescales the output of each target linear (the input of feed-forward ones).

Default targets are PEFT's for the architecture (Llama: k_proj, v_proj, down_proj; BERT: key, value,
output.dense); given --target-modules, the ones PEFT counts as feed-forward for it stay feed-forward.
"""

from __future__ import annotations

from peft import IA3Config, PeftModel
from peft.utils.constants import (TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING as FEEDFORWARD_DEFAULTS,
                                  TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING as TARGET_DEFAULTS)
from torch import nn
from transformers import PreTrainedModel

from training.config import TrainConfig
from training.errors import ConfigError
from training.methods.lora import check_linear_targets
from training.methods.peft_io import task_type, wrap


def _model_type(model: nn.Module) -> str:
    return str(getattr(getattr(model, "config", None), "model_type", ""))


def default_targets(model: nn.Module) -> tuple[str, ...]:
    targets = TARGET_DEFAULTS.get(_model_type(model))
    if not targets:
        raise ConfigError(f"no default IA3 targets for model type {_model_type(model)!r}; pass --target-modules")
    return tuple(targets)


def prepare(model: PreTrainedModel, config: TrainConfig, task: str, base_name: str) -> PeftModel:
    check_linear_targets(model, config.target_modules, base_name)
    feedforward_defaults = FEEDFORWARD_DEFAULTS.get(_model_type(model), ())
    feedforward = [t for t in config.target_modules if t in feedforward_defaults]
    ia3 = IA3Config(target_modules=list(config.target_modules), feedforward_modules=feedforward,
                    task_type=task_type(task))
    return wrap(model, ia3, base_name)
