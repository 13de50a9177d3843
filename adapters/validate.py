"""Check a parsed adapter against the base it is about to be served (or trained) on."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from torch import nn

from adapters.errors import AdapterMismatchError
from adapters.folder import AdapterFolder

MAX_REPORTED = 3


@dataclass(frozen=True)
class BaseSignature:
    """What an adapter must fit: the base's fingerprint and its linear layers' shapes.

    Module names are relative to the task model (`...ForCausalLM` / `...ForSequenceClassification`),
    the same names PEFT writes into adapter files.
    """

    name: str
    fingerprint: str
    linear_shapes: Mapping[str, tuple[int, int]]  # module name -> (out_features, in_features)
    hidden_size: int

    @classmethod
    def of(cls, model: nn.Module, name: str, fingerprint: str) -> "BaseSignature":
        shapes = {n: (m.out_features, m.in_features) for n, m in model.named_modules() if isinstance(m, nn.Linear)}
        return cls(name=name, fingerprint=fingerprint, linear_shapes=shapes, hidden_size=int(model.config.hidden_size))


def validate_against_base(adapter: AdapterFolder, base: BaseSignature) -> None:
    """Raise AdapterMismatchError naming the first mismatches; return None if the adapter fits."""
    manifest = adapter.manifest
    if manifest is not None and manifest.base_fingerprint and manifest.base_fingerprint != base.fingerprint:
        raise AdapterMismatchError(
            f"adapter was built for base {manifest.base_name!r} (fingerprint {manifest.base_fingerprint}), "
            f"but this server runs {base.name!r} (fingerprint {base.fingerprint})"
        )
    missing = [m for m in adapter.lora if m not in base.linear_shapes]
    if missing:
        raise AdapterMismatchError(
            f"adapter targets modules this base ({base.name!r}) does not have: {missing[:MAX_REPORTED]}"
        )
    for module, weights in adapter.lora.items():
        out_features, in_features = base.linear_shapes[module]
        if weights.a.shape[1] != in_features or weights.b.shape[0] != out_features:
            raise AdapterMismatchError(
                f"module {module!r}: adapter shapes lora_A {tuple(weights.a.shape)} / lora_B "
                f"{tuple(weights.b.shape)} do not fit the base layer (out={out_features}, in={in_features})"
            )
    for key, tensor in adapter.extra.items():
        if key.endswith(".weight") and tensor.dim() == 2 and tensor.shape[1] != base.hidden_size:
            raise AdapterMismatchError(
                f"head tensor {key!r} has input size {tensor.shape[1]}, base hidden size is {base.hidden_size}"
            )
