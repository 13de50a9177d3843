"""Prompt learning: the base is untouched, trained vectors are put in front of what it sees.

- `prompt` (prompt tuning, Lester et al. 2021): `num_virtual_tokens` trained embeddings prepended to the
  input embeddings, at the first layer only.
- `prefix` (prefix tuning, Li & Liang 2021) and `ptuning` (P-tuning v2, Liu et al. 2022) are the same
  architecture, "deep prompts": `num_virtual_tokens` trained key/value positions in the attention of EVERY
  layer (PEFT's PREFIX_TUNING, given to the model as its past key/values). They differ in how the prefixes
  are parameterised while training:
  `prefix` produces them with an MLP (embedding -> Linear(hidden, prefix_hidden_size) -> tanh -> Linear to
  every layer's keys and values: PEFT's `prefix_projection=True`), the reparameterisation Li & Liang found
  stabilises training; `ptuning` trains the per-layer prefixes directly (`prefix_projection=False`), which is
  what P-tuning v2 does (it drops the reparameterisation).
  Both save only the resulting prefixes, so a `prefix` folder is as small as a `ptuning` one.
PEFT's own "P_TUNING" type is P-tuning v1 (an encoder producing input-layer prompts); it is not used here.

Prompt tuning on a causal LM: PEFT returns logits for the virtual positions too ([B, V + S, vocab]);
`_input_positions_only` drops them so every method's model answers [B, S, vocab] for S input tokens, as
the tasks' evaluation expects. The labels PEFT pads itself, so the training loss is unaffected.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from peft import PeftModel, PrefixTuningConfig, PromptTuningConfig, PromptTuningInit
from torch import nn
from transformers import PreTrainedModel

from training.config import TrainConfig
from training.methods.peft_io import reload_peft, task_type, wrap

LOGITS_RANK = 3  # [B, S, vocab]: a language model's logits (a classifier's are [B, labels])


def prepare_prompt_tuning(model: PreTrainedModel, config: TrainConfig, task: str, base_name: str) -> PeftModel:
    peft_config = PromptTuningConfig(task_type=task_type(task), num_virtual_tokens=config.num_virtual_tokens,
                                     prompt_tuning_init=PromptTuningInit.RANDOM)
    return _input_positions_only(wrap(model, peft_config, base_name))


def prepare_prefix(model: PreTrainedModel, config: TrainConfig, task: str, base_name: str) -> PeftModel:
    hidden = config.prefix_hidden_size or int(model.config.hidden_size)
    peft_config = PrefixTuningConfig(task_type=task_type(task), num_virtual_tokens=config.num_virtual_tokens,
                                     prefix_projection=True, encoder_hidden_size=hidden)
    return wrap(model, peft_config, base_name)


def prepare_ptuning_v2(model: PreTrainedModel, config: TrainConfig, task: str, base_name: str) -> PeftModel:
    peft_config = PrefixTuningConfig(task_type=task_type(task), num_virtual_tokens=config.num_virtual_tokens,
                                     prefix_projection=False)
    return wrap(model, peft_config, base_name)


def reload(model: PreTrainedModel, folder: Path, device: torch.device | None = None) -> PeftModel:
    return _input_positions_only(reload_peft(model, folder))


def _input_positions_only(model: PeftModel) -> PeftModel:
    """Drop the virtual tokens' logits that prompt tuning adds on a causal LM (module docstring)."""
    config = model.active_peft_config
    if not (config.peft_type == "PROMPT_TUNING" and config.task_type == "CAUSAL_LM"):
        return model
    virtual = config.num_virtual_tokens

    def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> Any:
        ids = kwargs.get("input_ids", args[0] if args else None)
        logits = getattr(output, "logits", None)
        # only when the prompt was prepended: inside disable_adapter() the base answers for S positions
        if ids is not None and logits is not None and logits.dim() == LOGITS_RANK and logits.shape[1] == ids.shape[1] + virtual:
            output.logits = logits[:, virtual:]
        return output

    model.register_forward_hook(hook, with_kwargs=True)
    return model
