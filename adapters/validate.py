"""Check a parsed adapter against the base it is about to be served (or trained) on."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Mapping

from torch import nn

from adapters.errors import AdapterMismatchError
from adapters.folder import AdapterFolder
from adapters.prompt_spec import PromptSpec

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
    num_layers: int = 0  # what a prefix adapter must fit: layers, key/value heads, head size
    kv_heads: int = 0
    head_dim: int = 0

    @classmethod
    def of(cls, model: nn.Module, name: str, fingerprint: str) -> "BaseSignature":
        shapes = {n: (m.out_features, m.in_features) for n, m in model.named_modules() if isinstance(m, nn.Linear)}
        config = model.config
        heads = int(getattr(config, "num_attention_heads", 0) or 0)
        kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
        head_dim = int(getattr(config, "head_dim", None) or (config.hidden_size // heads if heads else 0))
        return cls(name=name, fingerprint=fingerprint, linear_shapes=shapes, hidden_size=int(config.hidden_size),
                   num_layers=int(getattr(config, "num_hidden_layers", 0) or 0), kv_heads=kv_heads, head_dim=head_dim)


def align_to_base(adapter: AdapterFolder, base: BaseSignature) -> AdapterFolder:
    """The adapter with its module names as the base names them. PEFT names modules relative to the model
    it wrapped: a FEATURE_EXTRACTION adapter trained on a bare encoder (`BertModel`) says
    `encoder.layer.0.attention.self.query` where the served task model has `bert.encoder.layer.0...`. When
    every LoRA module is missing from the base and one prefix (the first part of a base module name)
    makes them all fit, the names get that prefix; otherwise the adapter is returned as it is (and
    `validate_against_base` names what does not fit)."""
    names = list(adapter.lora)
    if not names or any(m in base.linear_shapes for m in names):
        return adapter
    prefixes = {key.split(".", 1)[0] for key in base.linear_shapes if "." in key}
    fitting = [p for p in sorted(prefixes) if all(f"{p}.{m}" in base.linear_shapes for m in names)]
    if len(fitting) != 1:
        return adapter
    prefix = fitting[0]
    return dataclasses.replace(adapter, lora={f"{prefix}.{m}": w for m, w in adapter.lora.items()})


def validate_against_base(adapter: AdapterFolder, base: BaseSignature) -> None:
    """Raise AdapterMismatchError naming the first mismatches; return None if the adapter fits."""
    manifest = adapter.manifest
    if manifest is not None and manifest.base_fingerprint and manifest.base_fingerprint != base.fingerprint:
        raise AdapterMismatchError(
            f"adapter was built for base {manifest.base_name!r} (fingerprint {manifest.base_fingerprint}), "
            f"but this server runs {base.name!r} (fingerprint {base.fingerprint})"
        )
    if adapter.prompt is not None:
        _check_prompt(adapter.prompt.spec, base)
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
    _check_ia3(adapter, base)
    _check_dense(adapter, base)
    for key, tensor in adapter.extra.items():
        if key.endswith(".weight") and tensor.dim() == 2 and tensor.shape[1] != base.hidden_size:
            raise AdapterMismatchError(
                f"head tensor {key!r} has input size {tensor.shape[1]}, base hidden size is {base.hidden_size}"
            )


def _check_ia3(adapter: AdapterFolder, base: BaseSignature) -> None:
    missing = [m for m in adapter.ia3 if m not in base.linear_shapes]
    if missing:
        raise AdapterMismatchError(
            f"IA3 adapter scales modules this base ({base.name!r}) does not have: {missing[:MAX_REPORTED]}")
    for module, scale in adapter.ia3.items():
        out_features, in_features = base.linear_shapes[module]
        expected = in_features if scale.on_input else out_features
        if scale.size != expected:
            side = "input" if scale.on_input else "output"
            raise AdapterMismatchError(
                f"module {module!r}: IA3 vector of size {scale.size} on the {side}, but the base layer has "
                f"{side} size {expected}")


def _check_dense(adapter: AdapterFolder, base: BaseSignature) -> None:
    not_linear = [m for m in adapter.dense if m not in base.linear_shapes]
    if not_linear:
        raise AdapterMismatchError(
            f"freeze folder trained {not_linear[:MAX_REPORTED]}, which {base.name!r} has no linear layer of: the "
            "server serves freeze folders whose trained modules are linear layers (and the head); train it with "
            "--freeze-last-k, or name only linear layers in --trainable-modules")
    for module, weights in adapter.dense.items():
        shape = base.linear_shapes[module]
        if tuple(weights.weight.shape) != shape or (weights.bias is not None and weights.bias.shape != (shape[0],)):
            raise AdapterMismatchError(
                f"module {module!r}: trained weight {tuple(weights.weight.shape)} does not fit the base layer "
                f"(out={shape[0]}, in={shape[1]})")


def _check_prompt(spec: PromptSpec, base: BaseSignature) -> None:
    if spec.kind == "prompt":
        if spec.token_dim != base.hidden_size:
            raise AdapterMismatchError(
                f"prompt adapter's virtual tokens have size {spec.token_dim}, base hidden size is {base.hidden_size}")
        return
    fits = (spec.num_layers, spec.num_heads, spec.token_dim) == (base.num_layers, base.kv_heads,
                                                                 base.kv_heads * base.head_dim)
    if not fits:
        raise AdapterMismatchError(
            f"prefix adapter is laid out for {spec.num_layers} layers x {spec.num_heads} key/value heads x "
            f"{spec.token_dim // spec.num_heads} dims; base {base.name!r} has {base.num_layers} x {base.kv_heads} x "
            f"{base.head_dim}")
