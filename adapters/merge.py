"""Merge math: fold a LoRA delta into a base weight and take it out again.

W' = W + scaling * B @ A, with A [r, in] and B [out, r]; unmerge subtracts the same product, so a
merge/unmerge round trip returns W up to floating-point rounding.
"""

from __future__ import annotations

import torch

from adapters.folder import LoraWeights


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
