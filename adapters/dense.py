"""Freeze fine-tunes as adapters: the trained linears' whole weights, in place of the base's for their rows.

`training freeze` writes only the tensors that trained, named as in the task model's state dict
(`bert.encoder.layer.5.intermediate.dense.weight`, `classifier.weight`, ...) into TRAINED_WEIGHTS_FILE.
Grouped per module here: a head's tensors become the adapter's head, every other module's `weight` (and
`bias`) its replacement weights. Whether each module is a linear layer of the base, with the base's shapes,
is adapters.validate's check: LayerNorms or embeddings that trained are refused there, by name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch

from adapters.errors import AdapterFormatError

TRAINED_WEIGHTS_FILE = "trained_weights.safetensors"
HEAD_MODULES = ("classifier", "score")  # BERT-style and decoder-style sequence-classification heads
PARAMS = ("weight", "bias")


@dataclass(frozen=True)
class DenseWeights:
    """One linear's trained weights: y = x @ weight.T + bias for the adapter's rows."""

    weight: torch.Tensor  # [out, in]
    bias: torch.Tensor | None  # [out]; None: the base layer's own bias stays (it did not train, or has none)


def split_dense_state(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, DenseWeights], dict[str, torch.Tensor]]:
    """{tensor name: value} -> ({module: DenseWeights}, {head tensor name: value})."""
    head: dict[str, torch.Tensor] = {}
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        module, _, param = key.rpartition(".")
        if module.split(".", 1)[0] in HEAD_MODULES:
            head[key] = tensor
        elif param not in PARAMS or not module:
            raise AdapterFormatError(f"{TRAINED_WEIGHTS_FILE}: tensor {key!r} is neither a weight nor a bias")
        else:
            parts.setdefault(module, {})[param] = tensor
    dense = {}
    for module, params in sorted(parts.items()):
        if "weight" not in params:
            raise AdapterFormatError(
                f"{TRAINED_WEIGHTS_FILE}: module {module!r} trained only its bias; served freeze folders replace "
                "whole linear layers")
        dense[module] = DenseWeights(weight=params["weight"], bias=params.get("bias"))
    if not dense and not head:
        raise AdapterFormatError(f"{TRAINED_WEIGHTS_FILE} holds no tensors")
    return dense, head
