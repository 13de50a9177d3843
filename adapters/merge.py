"""Merge math: fold a LoRA delta or an IA3 vector into a base layer's weights.

LoRA: W' = W + scaling * B @ A, with A [r, in] and B [out, r]; unmerge subtracts the same product, so a
merge/unmerge round trip returns W up to floating-point rounding.
IA3: W' = W * l[None, :] for a vector on the input; W' = W * l[:, None] and b' = b * l on the output.
Dividing it out again is not exact (nor defined where l is 0): whoever unmerges IA3 restores a copy.
"""

from __future__ import annotations

import torch

from adapters.folder import LoraWeights
from adapters.ia3_spec import IA3Scale


def lora_delta(weights: LoraWeights, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The dense [out, in] delta of one LoRA module, computed in `dtype`."""
    return (weights.b.to(dtype) @ weights.a.to(dtype)) * weights.scaling


@torch.no_grad()
def merge_into(weight: torch.Tensor, weights: LoraWeights) -> None:
    """Add the LoRA delta to `weight` in place (delta computed in fp32, then cast)."""
    weight += lora_delta(weights).to(device=weight.device, dtype=weight.dtype)


@torch.no_grad()
def unmerge_from(weight: torch.Tensor, weights: LoraWeights) -> None:
    """Subtract the LoRA delta from `weight` in place: the inverse of `merge_into`."""
    weight -= lora_delta(weights).to(device=weight.device, dtype=weight.dtype)


@torch.no_grad()
def ia3_merge_into(weight: torch.Tensor, bias: torch.Tensor | None, scale: IA3Scale) -> None:
    """Fold an IA3 vector into a linear's weight (and bias, for a vector on the output) in place."""
    vector = scale.vector.to(device=weight.device, dtype=weight.dtype)
    if scale.on_input:
        weight.mul_(vector[None, :])
        return
    weight.mul_(vector[:, None])
    if bias is not None:
        bias.mul_(vector.to(bias.dtype))
