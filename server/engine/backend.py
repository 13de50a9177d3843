"""Device, dtype and matmul kernel, chosen once at start-up from the config; nothing branches on them
in a forward."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from server.engine.quant_kernels import QuantKernels, quant_kernels_for

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

LinearFn = Callable[[torch.Tensor, torch.Tensor, Optional[torch.Tensor]], torch.Tensor]
PackFn = Callable[[torch.Tensor], torch.Tensor]
# Batch-size hint for oneDNN's weight layout; any batch size works with it (decode batches gain most).
PACK_BATCH_HINT = 8


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ weight.T + bias through oneDNN's linear; `weight` plain or packed by `onednn_pack`.

    On this project's 2-core x86 machine a pass over SmolLM2's 211 weight matrices ran 1.44x faster than
    F.linear (MKL) at 8 rows and 1.27x at 512 rows, and packed weights 1.4-1.7x faster again at 8 rows
    (benchmarks/bench_linear.py)."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def onednn_pack(weight: torch.Tensor) -> torch.Tensor:
    """The weight reordered once into oneDNN's blocked layout, which plain weights get on every call.
    An opaque tensor, only for `onednn_linear`; the plain weight stays the module's `.weight`."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), PACK_BATCH_HINT)


def no_pack(weight: torch.Tensor) -> torch.Tensor:
    return weight


def linear_kernel_for(device: torch.device, dtype: torch.dtype) -> tuple[LinearFn, PackFn]:
    """oneDNN with packed weights on CPU where this torch has it and it agrees with F.linear (2D and 3D
    inputs); F.linear on plain weights everywhere else."""
    if device.type != "cpu" or dtype not in (torch.float32, torch.bfloat16) or not torch.backends.mkldnn.is_available():
        return F.linear, no_pack
    try:
        weight, bias = torch.randn(40, 24, dtype=dtype), torch.randn(40, dtype=dtype)
        packed = onednn_pack(weight)
        tolerance = 1e-4 if dtype == torch.float32 else 5e-2
        for probe in (torch.randn(3, 2, 24, dtype=dtype), torch.randn(5, 24, dtype=dtype)):
            expected = F.linear(probe, weight, bias).float()
            for w in (weight, packed):
                if not torch.allclose(onednn_linear(probe, w, bias).float(), expected, atol=tolerance, rtol=tolerance):
                    raise RuntimeError("disagrees with F.linear")
    except (RuntimeError, AttributeError) as exc:
        log.warning("oneDNN linear unavailable (%s); using F.linear", exc)
        return F.linear, no_pack
    return onednn_linear, onednn_pack


@dataclass(frozen=True)
class Backend:
    device: torch.device
    dtype: torch.dtype
    linear: LinearFn | None = None  # None: the fastest agreeing kernel for device and dtype (with its pack)
    pack: PackFn = no_pack  # weight -> the form `linear` reads fastest; set together with linear
    quant: str = "none"  # the base's quantization (server/engine/quant_kernels.py), with its kernels
    quant_kernels: QuantKernels | None = None

    def __post_init__(self) -> None:
        if self.quant_kernels is not None:  # the base matmuls run on quantized matrices: nothing to pack
            object.__setattr__(self, "linear", F.linear)
        elif self.linear is None:
            linear, pack = linear_kernel_for(self.device, self.dtype)
            object.__setattr__(self, "linear", linear)
            object.__setattr__(self, "pack", pack)


def choose_backend(device: str, dtype: str, quant: str) -> Backend:
    """`auto` means CUDA with bfloat16 when there is a GPU, else CPU with float32 (PEFT-exact outputs).
    A quantized base keeps its activations (and the adapters' deltas) in that dtype too; raises
    QuantUnavailableError (a ValueError) when this machine cannot run `quant`."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but CUDA is not available on this machine")
    if dtype == "auto":
        dtype = "bfloat16" if device == "cuda" else "float32"
    torch_device = torch.device(device)
    return Backend(device=torch_device, dtype=_DTYPES[dtype], quant=quant,
                   quant_kernels=quant_kernels_for(torch_device, quant))
