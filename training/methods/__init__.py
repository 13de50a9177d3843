"""Every fine-tuning method behind one call: `prepare_model(model, config, task, base_name)`.

The method is looked up once in `METHOD_TABLE`; nothing else in `training/` branches on it. Each entry says
how to make a loaded HF model trainable, which modules it targets by default, how to write the trained
result into a folder and how to read that folder back onto a fresh base.

| method    | what trains                                              | folder written                                |
|-----------|----------------------------------------------------------|-----------------------------------------------|
| `lora`    | low-rank A, B on the target linears (rsLoRA, DoRA)        | PEFT LoRA (served)                            |
| `qlora`   | the same LoRA, over a base whose linears are 4-bit (NF4) | PEFT LoRA, base weights not included (served) |
| `prompt`  | `num_virtual_tokens` input embeddings (prompt tuning)    | PEFT PROMPT_TUNING                            |
| `prefix`  | key/value prefixes on every layer, made by an MLP        | PEFT PREFIX_TUNING (the MLP's output saved)   |
| `ptuning` | key/value prefixes on every layer, trained directly      | PEFT PREFIX_TUNING                            |
| `ia3`     | one scaling vector per target linear (IA3)               | PEFT IA3 (served)                             |
| `freeze`  | the last k blocks' MLPs' linears, or named modules       | the trained tensors only (`plain.py`; served) |
| `full`    | every weight                                             | a complete HF model folder (served as a base) |

For classification every method also trains the new head (PEFT's modules_to_save, or the head's own
weights for freeze / full). The server serves `adapters.SERVED_METHODS` per request in mixed batches (LoRA,
IA3 and freeze folders for both tasks; prompt, prefix and P-tuning v2 folders for completion) and a full
fine-tune as its base (`server serve --base DIR`); add-adapter of a full folder is a 400 that says so.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from transformers import PreTrainedModel

from training.config import METHODS, TrainConfig
from training.device import CPU, resolve_device
from training.errors import ConfigError
from training.methods import ia3, lora, plain, prompt, qlora
from training.methods.peft_io import reload_peft, save_peft

Prepare = Callable[[PreTrainedModel, TrainConfig, str, str], nn.Module]  # (model, config, task, base name)
Save = Callable[[nn.Module, Path, Path], None]  # (trained model, folder being written, base folder)
# (fresh base loaded as for training, on the CPU; folder; device it will compute on: qlora quantizes its base
# straight onto it, the others are moved there whole afterwards)
Reload = Callable[[PreTrainedModel, Path, torch.device], nn.Module]


def _no_targets(model: nn.Module) -> tuple[str, ...]:
    return ()


@dataclass(frozen=True)
class Method:
    """One row of the table: the three things a method must say, plus its default target modules."""

    name: str
    prepare: Prepare
    save: Save
    reload: Reload
    default_targets: Callable[[nn.Module], tuple[str, ...]] = _no_targets


METHOD_TABLE: dict[str, Method] = {
    "lora": Method("lora", lora.prepare, save_peft, reload_peft, lora.default_targets),
    "qlora": Method("qlora", qlora.prepare, save_peft, qlora.reload, lora.default_targets),
    "prompt": Method("prompt", prompt.prepare_prompt_tuning, save_peft, prompt.reload),
    "prefix": Method("prefix", prompt.prepare_prefix, save_peft, prompt.reload),
    "ptuning": Method("ptuning", prompt.prepare_ptuning_v2, save_peft, prompt.reload),
    "ia3": Method("ia3", ia3.prepare, save_peft, reload_peft, ia3.default_targets),
    "freeze": Method("freeze", plain.prepare_freeze, plain.save_trained_tensors, plain.reload_trained_tensors),
    "full": Method("full", plain.prepare_full, plain.save_full_model, plain.reload_full_model),
}
assert tuple(METHOD_TABLE) == METHODS, "every method of the CLI has a row"


def method_of(name: str) -> Method:
    try:
        return METHOD_TABLE[name]
    except KeyError:
        raise ConfigError(f"method must be one of {', '.join(METHOD_TABLE)}, got {name!r}") from None


def prepare_model(model: PreTrainedModel, config: TrainConfig, task: str, base_name: str) -> nn.Module:
    """`model` (loaded on the CPU) made trainable by config.method (base weights frozen unless the method
    trains them), on the device config.device names.

    The method wraps the model where it was loaded, so new weights (LoRA A, a head) are initialised from the
    CPU's RNG, the same on every device; then the whole model moves (qlora's base linears are quantized on
    their way there, by its prepare). The result is called like the HF model, has `disable_adapter()` (a
    context in which it computes what the base computed) and is what `save_trained` writes.
    """
    device = resolve_device(config.device)
    return method_of(config.method).prepare(model, config, task, base_name).to(device)


def default_target_modules(model: nn.Module, method: str = "lora") -> tuple[str, ...]:
    """The modules `method` wraps when --target-modules is not given (empty for methods that take none)."""
    return method_of(method).default_targets(model)


def save_trained(model: nn.Module, method: str, folder: Path, base_path: Path) -> None:
    """Write what `method` trained into `folder` (the manifest is the caller's job)."""
    method_of(method).save(model, Path(folder), Path(base_path))


def reload_trained(model: PreTrainedModel, method: str, folder: str | Path, device: torch.device = CPU) -> nn.Module:
    """`model` (a fresh base loaded as for training, head included) with the folder's trained result applied,
    on `device`, in eval mode: it computes what the trained model computed when the folder was written."""
    reloaded = method_of(method).reload(model, Path(folder), device).to(device)
    reloaded.eval()
    return reloaded
