"""IA3 adapters (PEFT's `IA3`): one learned vector per target linear, served per request.

PEFT saves `<module>.ia3_l` per target linear, shaped by where the vector acts:

- `[out, 1]`: it rescales the layer's output, bias included: y = (x W.T + b) * l  (keys, values);
- `[1, in]`: it rescales the layer's input (PEFT's `feedforward_modules`): y = (x * l) W.T + b.

The shape alone says which (even for a square layer), so the config's `feedforward_modules` is
cross-checked against it rather than trusted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch

from adapters.errors import AdapterFormatError

IA3_PEFT_TYPE = "IA3"
IA3_SUFFIX = ".ia3_l"
IA3_TASK_TYPES = ("CAUSAL_LM", "SEQ_CLS", None)


@dataclass(frozen=True)
class IA3Spec:
    target_modules: tuple[str, ...] | str
    feedforward_modules: tuple[str, ...] | str
    task_type: str | None = None
    modules_to_save: tuple[str, ...] = ()
    base_model_name_or_path: str | None = None


@dataclass(frozen=True)
class IA3Scale:
    """One wrapped linear's vector: on its input (`on_input`, [in]) or on its output ([out])."""

    vector: torch.Tensor  # 1-D
    on_input: bool

    @property
    def size(self) -> int:
        return self.vector.shape[0]


def is_ia3_config(raw: Mapping[str, Any]) -> bool:
    return str(raw.get("peft_type", "")).upper() == IA3_PEFT_TYPE


def parse_ia3_config(raw: Mapping[str, Any]) -> IA3Spec:
    """Validate an IA3 `adapter_config.json`, or raise AdapterFormatError."""
    if raw.get("task_type") not in IA3_TASK_TYPES:
        raise AdapterFormatError(f"IA3 adapters are served for CAUSAL_LM or SEQ_CLS, not {raw.get('task_type')!r}")
    if raw.get("fan_in_fan_out"):
        raise AdapterFormatError("fan_in_fan_out adapters (GPT-2 Conv1D style) are not supported")
    targets = raw.get("target_modules")
    if not (isinstance(targets, str) and targets) and not (
            isinstance(targets, list) and targets and all(isinstance(t, str) and t for t in targets)):
        raise AdapterFormatError("'target_modules' must be a non-empty list of module names or a regex")
    feedforward = raw.get("feedforward_modules") or ()
    return IA3Spec(
        target_modules=targets if isinstance(targets, str) else tuple(sorted(targets)),
        feedforward_modules=feedforward if isinstance(feedforward, str) else tuple(sorted(feedforward)),
        task_type=raw.get("task_type"),
        modules_to_save=tuple(raw.get("modules_to_save") or ()),
        base_model_name_or_path=raw.get("base_model_name_or_path"),
    )


def split_ia3_state(state: Mapping[str, torch.Tensor], prefix: str) -> tuple[dict[str, IA3Scale], dict[str, torch.Tensor]]:
    """PEFT's saved tensors -> ({module: IA3Scale}, {other tensor: value}, e.g. a classification head)."""
    scales: dict[str, IA3Scale] = {}
    extra: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        name = key[len(prefix):] if key.startswith(prefix) else key
        if not name.endswith(IA3_SUFFIX):
            if ".ia3_" in name:
                raise AdapterFormatError(f"tensor {key!r} is not an IA3 weight this server understands")
            extra[name] = tensor
            continue
        if tensor.dim() != 2 or 1 not in tensor.shape:
            raise AdapterFormatError(f"tensor {key!r} has shape {tuple(tensor.shape)}; IA3 vectors are [out, 1] or [1, in]")
        on_input = tensor.shape[0] == 1 and tensor.shape[1] != 1
        scales[name[: -len(IA3_SUFFIX)]] = IA3Scale(vector=tensor.reshape(-1), on_input=on_input)
    if not scales:
        raise AdapterFormatError("adapter_model.safetensors holds no IA3 vectors (ia3_l)")
    return scales, extra
