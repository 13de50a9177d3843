"""Device and dtype, chosen once at start-up from the config; nothing branches on them in a forward."""

from __future__ import annotations

from dataclasses import dataclass

import torch

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Backend:
    device: torch.device
    dtype: torch.dtype


def choose_backend(device: str, dtype: str, quant: str) -> Backend:
    """`auto` means CUDA with bfloat16 when there is a GPU, else CPU with float32 (PEFT-exact outputs)."""
    if quant != "none":
        raise ValueError(f"--quant {quant} is not available yet; serve with --quant none")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but CUDA is not available on this machine")
    if dtype == "auto":
        dtype = "bfloat16" if device == "cuda" else "float32"
    return Backend(device=torch.device(device), dtype=_DTYPES[dtype])
