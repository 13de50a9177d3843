"""Where a training run computes: the device (`--device`), the autocast dtype (`--precision`) and whether the
optimizer (`--optim`) runs there, decided once at start-up (`choose_compute`, called by training.runner before
data or model load) so a run that cannot work stops with one clear line instead of a traceback later.

Everything else follows the model: it is loaded on the CPU (fp32, training.models), made trainable, then
moved to `Compute.device` (QLoRA's base linears are quantized on their way there, training.methods.qlora);
batches go to the device of the model's weights (`model_device`, `to_device`); adapter folders are written
from CPU tensors, so a folder is the same file whether it was trained on a GPU or on the CPU.

On the CPU nothing changes from before devices existed: fp32, torch's AdamW, the same losses bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import nn

from training.config import AUTO, TrainConfig
from training.errors import ConfigError

CPU = torch.device("cpu")
CUDA = "cuda"
PAGED_OPTIMIZERS = ("paged_adamw_8bit",)  # bitsandbytes pages their state through CUDA unified memory: CUDA only
BNB_INSTALL_HINT = "pip install 'loraplex[qlora]', or scripts/setup.sh"


@dataclass(frozen=True)
class Compute:
    """The device a run trains on and the dtype its forward autocasts to (None: plain fp32).

    Weights, gradients and optimizer state stay fp32 whatever `autocast` is (master weights): autocast only
    runs matmuls in bf16 and keeps reductions such as the loss in fp32.
    """

    device: torch.device
    autocast: torch.dtype | None

    @property
    def precision(self) -> str:
        """What the run computed in, as reports name it: bf16 or fp32."""
        return "bf16" if self.autocast is torch.bfloat16 else "fp32"


def resolve_device(spec: str) -> torch.device:
    """`auto` -> cuda when torch sees a CUDA device, else cpu; `cpu`, `cuda`, `cuda:N` as they are, once checked
    to exist here (ConfigError names what is missing: the CLI prints it and exits 2)."""
    if spec == AUTO:
        return torch.device(CUDA) if torch.cuda.is_available() else CPU
    try:
        device = torch.device(spec)
    except RuntimeError as exc:
        raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got {spec!r}") from exc
    if device.type == CUDA:
        if not torch.cuda.is_available():
            built = f"CUDA {torch.version.cuda}" if torch.version.cuda else "without CUDA"
            raise ConfigError(f"device {spec}: no CUDA device is available on this machine (torch {torch.__version__}, "
                              f"built {built}); use --device cpu, or auto to take a GPU only where there is one")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ConfigError(f"device {spec}: this machine has {count} CUDA device(s), numbered 0 to {count - 1}")
    elif device.type != "cpu":
        raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got {spec!r}")
    return device


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 when asked (or, with auto, on a CUDA device that has it); None runs the forward in fp32.

    auto stays fp32 on the CPU: that is the fast dtype there, and the server's CPU default, so the figures
    training measures are what serving computes. bf16 asked for on the CPU runs (slowly) as asked.
    """
    cuda_bf16 = device.type == CUDA and torch.cuda.is_bf16_supported()
    if precision == "bf16":
        if device.type == CUDA and not cuda_bf16:
            raise ConfigError(f"precision bf16: the CUDA device {device} does not support bfloat16; use fp32")
        return torch.bfloat16
    if precision == AUTO and cuda_bf16:
        return torch.bfloat16
    return None


def check_optimizer(optim: str, device: torch.device) -> None:
    """ConfigError when `optim` cannot run on `device`, or needs bitsandbytes and it is not installed.

    bitsandbytes 0.50 runs AdamW8bit on CPU (8-bit moments, blockwise quantized; a tensor under bitsandbytes'
    min_8bit_size, 4,096 values, keeps 32-bit state). Its PagedAdamW8bit on CPU only warns and falls back to
    the unpaged optimizer: refused here, rather than run as something else than asked.
    """
    if optim == "adamw":
        return
    if optim in PAGED_OPTIMIZERS and device.type != CUDA:
        raise ConfigError(f"optim {optim} needs a CUDA device; this run trains on {device.type}, where "
                          "bitsandbytes has no paged optimizer (it would silently run unpaged): use --optim "
                          "adamw_8bit, or --device cuda on a machine with a GPU")
    try:
        import bitsandbytes  # noqa: F401  (only whether it imports)
    except ImportError as exc:
        raise ConfigError(f"optim {optim} needs bitsandbytes ({BNB_INSTALL_HINT}): {exc}") from exc


def choose_compute(config: TrainConfig) -> Compute:
    """The run's device and autocast dtype from config.device / config.precision, with config.optim checked
    against that device: every refusal a user can cause, before anything loads."""
    device = resolve_device(config.device)
    compute = Compute(device, autocast_dtype(config.precision, device))
    check_optimizer(config.optim, device)
    return compute


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's weights (a model is on one device here: training.methods moves it whole)."""
    for param in model.parameters():
        return param.device
    return CPU


def to_device(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    """A batch's tensors moved to `device` (other values as they are); on the CPU, the same tensors."""
    return {key: value.to(device) if isinstance(value, torch.Tensor) else value for key, value in batch.items()}


def to_cpu(model: nn.Module) -> nn.Module:
    """`model` moved to the CPU (a no-op there): what an adapter folder is written from, once training is over
    (it also hands the accelerator's memory back). bitsandbytes' 4-bit weights move with their quantization
    state."""
    return model.to(CPU) if model_device(model).type != CPU.type else model
