"""A quantized frozen base: its linear layers (and input embedding) swapped for quantized matrices.

Two ways in, one way out (gpt-fast's two phases):
- a full-precision folder with `--quant int8|int4`: loaded as usual, quantized in memory by
  `adapters.quantized.quantize_model` (the same code `training export --format int8|int4` runs);
- a quantized folder (`quantization.json`, written by that export): the model is built from its config
  with empty weights, the plain tensors are assigned from the checkpoint, the quantized matrices are
  packed for this machine's kernel. Nothing is quantized again.
Either way every LoraLinear then runs its base matmul on a QuantMatrix and the full-precision weight is
freed; adapters apply on top unchanged. `--quant nf4|fp4` (and every mode on CUDA) hands the weights to
bitsandbytes instead, exactly as `training qlora` quantizes its base: the backbone's linears only.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from adapters.quantized import QuantConfig, QuantizedWeights, load_quantized
from server.engine.lora_layer import LoraLinear
from server.engine.quant_kernels import QuantKernels, QuantMatrix

log = logging.getLogger(__name__)


class QuantLoadError(ValueError):
    """A quantized checkpoint that this server, as started, cannot load (a user error: one line)."""


class QuantEmbedding(nn.Module):
    """An embedding table held int8 (TorchInt8 or TorchInt8Channel: anything with `rows`); a head tied to it
    reads the same matrix."""

    def __init__(self, matrix: QuantMatrix, dtype: torch.dtype, padding_idx: int | None) -> None:
        super().__init__()
        self.matrix = matrix
        self.dtype = dtype
        self.padding_idx = padding_idx
        self.num_embeddings, self.embedding_dim = matrix.out_features, matrix.in_features

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:  # [B, S] -> [B, S, hidden]
        return self.matrix.rows(input_ids, self.dtype)


@dataclass(frozen=True)
class QuantSummary:
    """What start-up logs and /metrics report about a quantized base."""

    quant: str
    kernel: str  # e.g. "torch int4 (CPU)" or "bitsandbytes nf4"
    matrices: int
    weight_bytes: int  # every weight the model holds: quantized matrices and the tensors left as they were


def load_quantized_folder(path: Path, model_cls, dtype: torch.dtype) -> tuple[nn.Module, QuantizedWeights]:
    """The model of a quantized folder with its plain tensors in place and its quantized ones aside."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig

    config, plain, weights = load_quantized(path)
    with init_empty_weights(include_buffers=False):
        model = model_cls.from_config(AutoConfig.from_pretrained(path), dtype=dtype)
    result = model.load_state_dict({k: v.to(dtype) if v.is_floating_point() else v for k, v in plain.items()},
                                   strict=False, assign=True)
    expected = {f"{name}.weight" for name in (*config.modules, *config.tied)}
    missing = sorted(set(result.missing_keys) - expected)
    if missing:
        raise QuantLoadError(f"{path}: {len(missing)} tensors missing from the quantized checkpoint, e.g. {missing[0]}")
    return model, weights


def check_folder_matches(config: QuantConfig, quant: str, kernels: QuantKernels | None, path: Path) -> None:
    """A quantized folder is served only with the --quant it was made with, by kernels that read it."""
    if quant != config.method:
        raise QuantLoadError(f"{path} holds an {config.method}-quantized checkpoint (quantization.json) but the "
                             f"server was started with --quant {quant}: start it with --quant {config.method}")
    if kernels is None or not kernels.reads_checkpoints:
        raise QuantLoadError(f"--quant {quant} on this device uses bitsandbytes, which quantizes full-precision "
                             f"weights itself: serve the unquantized base with --quant {quant} instead of {path}")


def quantize_base(model: nn.Module, kernels: QuantKernels, device: torch.device, dtype: torch.dtype,
                  weights: QuantizedWeights | None = None) -> QuantSummary:
    """Swap `model`'s (already LoraLinear-wrapped) base matmuls for quantized ones; frees the plain weights.
    `weights`: the checkpoint's (or `quantize_model`'s, run on the model before wrapping) for torch kernels."""
    if kernels.reads_checkpoints:
        if weights is None:
            raise ValueError("torch quantization kernels need the quantized weights (adapters.quantized.quantize_model)")
        matrices = _install_checkpoint(model, kernels, weights, dtype)
        kernel = f"{kernels.kind} {kernels.quant} ({device.type})"
    else:
        matrices = _install_bnb(model, kernels, device, dtype)
        kernel = f"bitsandbytes {kernels.bnb_mode}"
    if device.type == "cpu":
        model.to(device)
    _own_storage(model)
    _release_freed_memory()
    still_meta = [name for name, p in model.named_parameters() if p.is_meta]
    if still_meta:
        raise QuantLoadError(f"{len(still_meta)} weights were never loaded, e.g. {still_meta[0]}")
    plain = sum(p.numel() * p.element_size() for p in model.parameters())
    plain += sum(b.numel() * b.element_size() for b in model.buffers())
    unique = {id(m): m for m in matrices}
    total = plain + sum(m.nbytes() for m in unique.values())
    return QuantSummary(kernels.quant, kernel, len(unique), total)


def _install_checkpoint(model: nn.Module, kernels: QuantKernels, weights: QuantizedWeights,
                        dtype: torch.dtype) -> list[QuantMatrix]:
    config = weights.config
    matrices: dict[str, QuantMatrix] = {}
    for name in list(weights.tensors):
        matrices[name] = kernels.from_checkpoint(config.modules[name], weights.tensors.pop(name), config.group_size)
    for name, matrix in matrices.items():
        module = model.get_submodule(name)
        if isinstance(module, nn.Embedding):
            _replace(model, name, QuantEmbedding(matrix, dtype, module.padding_idx))
        elif isinstance(module, LoraLinear):
            module.use_quantized(matrix)
        else:
            raise QuantLoadError(f"quantization.json names {name!r}, a {type(module).__name__}, not a linear or embedding")
    for head, embedding in config.tied.items():
        module = model.get_submodule(head)
        if not isinstance(module, LoraLinear):
            raise QuantLoadError(f"quantization.json ties {head!r}, which is not a linear layer")
        module.use_quantized(matrices[embedding])
    return list(matrices.values())


def _install_bnb(model: nn.Module, kernels: QuantKernels, device: torch.device, dtype: torch.dtype) -> list[QuantMatrix]:
    """Every LoraLinear of the backbone (not the task head): what `training qlora` quantizes."""
    prefix = model.base_model_prefix + "."
    matrices = []
    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLinear) and name.startswith(prefix):
            matrix = kernels.from_weight(module.base.weight.to(device), device, dtype)
            module.use_quantized(matrix)
            matrices.append(matrix)
    return matrices


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def _own_storage(model: nn.Module) -> None:
    """Copy the tensors left full-precision (norms, biases) out of the checkpoint: transformers loads them as
    views of one mapping of the whole safetensors file, which would keep every freed weight resident."""
    for tensor in (*model.parameters(), *model.buffers()):
        tensor.data = tensor.data.clone()


def _release_freed_memory() -> None:
    """Hand the freed full-precision weights back to the OS: glibc keeps freed heap pages mapped, so the
    resident size would not shrink (`malloc_trim` is glibc's; elsewhere this only collects)."""
    gc.collect()
    name = ctypes.util.find_library("c")
    if name is None:
        return
    libc = ctypes.CDLL(name)
    if hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)
