"""Freeze and full fine-tuning: the base model's own weights train, no PEFT wrapper.

- `freeze` trains the linear layers of the MLPs of the last `freeze_last_k` transformer blocks (BERT: the
  dense layers of a block's `intermediate` and `output`, not the LayerNorm after them; Llama: `mlp`'s
  gate, up and down projections), or the modules named in `trainable_modules` (a full name or a dotted
  suffix; every parameter under them), plus, for classification, the new head.
- `full` trains every weight.

What they write (decided here, stated by the manifest's `method`):
- freeze: `trained_weights.safetensors`, only the tensors that trained, named as in the task model's
  state dict (`bert.encoder.layer.5.intermediate.dense.weight`, `classifier.weight`, ...). It is small
  (the last two MiniLM MLPs: 2.4 M values) and is applied to a fresh base with `load_state_dict`.
- full: a complete Hugging Face model folder (config.json, model.safetensors, the base's tokenizer), loadable
  by `AutoModelFor...from_pretrained(folder)` alone.
The server serves a freeze folder per request (adapters/dense.py: its rows take the trained linears'
weights; a folder that trained anything but linear layers and the head is refused by name), and a full
folder as its base (`server serve --base DIR`, the trained head then classifies under the base's id).

`PlainFineTune` gives the tasks what PEFT's wrapper gives them: a `disable_adapter()` context in which the
model computes with the base's weights again (the "before" figures), by swapping tensors, not copying them.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoTokenizer, PreTrainedModel

from adapters.dense import HEAD_MODULES, TRAINED_WEIGHTS_FILE
from training.config import DEFAULT_FREEZE_LAST_K, TrainConfig
from training.errors import ConfigError
from training.methods.peft_io import matches

MLP_CHILD_NAMES = ("mlp", "intermediate", "output", "feed_forward", "ffn")  # a block's feed-forward parts
FULL_MODEL_WEIGHTS = "model.safetensors"


class PlainFineTune(nn.Module):
    """The HF model with `trainable` parameters unfrozen and the rest frozen; called like the model."""

    def __init__(self, model: PreTrainedModel, trainable: set[str]) -> None:
        super().__init__()
        self.model = model
        for name, param in model.named_parameters():
            param.requires_grad_(name in trainable)
        self.trainable_names = tuple(name for name, _ in model.named_parameters() if name in trainable)
        # the base's values of what will train, kept outside the module so they are neither trained nor saved
        self._base_values = {name: p.detach().clone() for name, p in model.named_parameters() if name in trainable}

    @property
    def config(self) -> Any:
        return self.model.config

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Compute with the base's values of the trained tensors inside the block (tensors swapped, not copied).

        The base's values stay where the model was loaded (the CPU): on a GPU they are copied onto it for the
        block only, so a full fine-tune does not hold a second copy of every weight in GPU memory."""
        params = dict(self.model.named_parameters())
        trained = {}
        for name, base_value in self._base_values.items():
            trained[name] = params[name].data
            params[name].data = base_value.to(params[name].device)
        try:
            yield
        finally:
            for name, value in trained.items():
                params[name].data = value

    def trained_state(self) -> dict[str, torch.Tensor]:
        params = dict(self.model.named_parameters())
        return {name: params[name].detach().contiguous() for name in self.trainable_names}


def _head_parameters(model: nn.Module, task: str) -> set[str]:
    if task != "classification":
        return set()
    return {name for name, _ in model.named_parameters() if name.split(".", 1)[0] in HEAD_MODULES}


def _blocks(model: PreTrainedModel) -> nn.ModuleList:
    """The transformer blocks: the ModuleList as long as config.num_hidden_layers."""
    layers = int(getattr(model.config, "num_hidden_layers", 0))
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == layers and layers > 0:
            return module
    raise ConfigError("freeze cannot find this base's transformer blocks; pass --trainable-modules")


def freeze_selection(model: PreTrainedModel, config: TrainConfig, task: str) -> set[str]:
    """Names of the parameters `freeze` trains (see the module docstring)."""
    prefixes: list[str] = []
    modules = dict(model.named_modules())
    if config.trainable_modules:
        for target in config.trainable_modules:
            found = [name for name in modules if name and matches(name, target)]
            if not found:
                raise ConfigError(f"trainable module {target!r} is not a module of this base "
                                  f"(e.g. {', '.join(list(modules)[1:6])}, ...)")
            prefixes += found
    else:
        k = config.freeze_last_k or DEFAULT_FREEZE_LAST_K
        blocks = _blocks(model)
        if k > len(blocks):
            raise ConfigError(f"freeze_last_k={k} but this base has {len(blocks)} blocks")
        block_names = {id(m): name for name, m in modules.items()}
        for block in list(blocks)[-k:]:
            parts = [child for child in MLP_CHILD_NAMES if hasattr(block, child)]
            if not parts:
                raise ConfigError("freeze cannot find the MLP of this base's blocks; pass --trainable-modules")
            prefixes += [f"{name}" for part in parts for name, module in modules.items()
                         if name.startswith(f"{block_names[id(block)]}.{part}.") and isinstance(module, nn.Linear)]
    selected = {name for name, _ in model.named_parameters() if any(name.startswith(p + ".") for p in prefixes)}
    return selected | _head_parameters(model, task)


def prepare_freeze(model: PreTrainedModel, config: TrainConfig, task: str, base_name: str) -> PlainFineTune:
    return PlainFineTune(model, freeze_selection(model, config, task))


def prepare_full(model: PreTrainedModel, config: TrainConfig, task: str, base_name: str) -> PlainFineTune:
    return PlainFineTune(model, {name for name, _ in model.named_parameters()})


def save_trained_tensors(model: nn.Module, folder: Path, base_path: Path) -> None:
    save_file(_plain(model).trained_state(), str(folder / TRAINED_WEIGHTS_FILE))


def reload_trained_tensors(model: PreTrainedModel, folder: Path, device: torch.device | None = None) -> PlainFineTune:
    tensors = load_file(str(folder / TRAINED_WEIGHTS_FILE))
    unknown = sorted(set(tensors) - set(model.state_dict()))
    if unknown:
        raise ConfigError(f"{TRAINED_WEIGHTS_FILE} holds tensors this base does not have: {unknown[:3]}")
    result = PlainFineTune(model, set(tensors))
    model.load_state_dict(tensors, strict=False)
    return result


def save_full_model(model: nn.Module, folder: Path, base_path: Path) -> None:
    """model.save_pretrained + the base's tokenizer: a folder that stands alone as a model."""
    hf_model = _plain(model).model
    hf_model.save_pretrained(folder, safe_serialization=True)
    AutoTokenizer.from_pretrained(base_path).save_pretrained(folder)


def reload_full_model(model: PreTrainedModel, folder: Path, device: torch.device | None = None) -> PlainFineTune:
    """`model` (the fresh base) with the folder's weights loaded into it; `disable_adapter()` gives the base's
    weights back, as during training."""
    tuned = type(model).from_pretrained(folder, dtype=model.dtype)
    result = PlainFineTune(model, {name for name, _ in model.named_parameters()})  # keeps the base's values
    model.load_state_dict(tuned.state_dict())
    return result


def _plain(model: nn.Module) -> PlainFineTune:
    if not isinstance(model, PlainFineTune):
        raise TypeError(f"expected the model prepare_freeze / prepare_full returned, got {type(model).__name__}")
    return model
