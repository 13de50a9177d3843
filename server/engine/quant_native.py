"""Quantized base matrices on the native CPU kernels (server/engine/native/qgemm.cpp).

Same checkpoint tensors as the torch kinds in quant_kernels.py, repacked once at load; activations
stay in fp32 end to end (x in another dtype is widened for the base matmul and the result cast back).
Long prefill chunks (DEQUANT_ROWS rows and more) dequantize the matrix into a scratch fp32 buffer and
run one oneDNN matmul instead: past a few dozen rows that is faster than re-widening every weight per
block of eight rows (measured by `python benchmarks/bench_quant.py --kernels`).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from adapters.quantized import unpack_int4
from server.engine.native import QGemmLibrary

DEQUANT_ROWS = 64  # rows (tokens) from which dequantize + fp32 matmul beats the native kernels
INT4_BLOCK = 32  # weights per packed int4 block: byte j holds k = j (low nibble) and k = j + 16 (high)


def _fp32_rows(x: torch.Tensor) -> torch.Tensor:
    flat = x.reshape(-1, x.shape[-1])
    return flat if flat.dtype == torch.float32 and flat.is_contiguous() else flat.float().contiguous()


class _NativeMatrix:
    """A quant_kernels.QuantMatrix (structurally) whose small-row products run in qgemm.cpp.

    Every kind stores its tensors row-major by output row ([N, ...]): `ROW_TENSORS` names them, and rows
    lo:hi of the matrix are those tensors' rows lo:hi (what `fuse_rows` relies on)."""

    ROW_TENSORS: tuple[str, ...]
    out_features: int
    in_features: int
    lib: QGemmLibrary
    dequant_rows: int

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        flat = _fp32_rows(x)
        if flat.shape[0] >= self.dequant_rows:
            out = F.linear(flat, self.dequantize())
        else:
            out = torch.empty(flat.shape[0], self.out_features, dtype=torch.float32)
            self._gemm(flat, out)
        if bias is not None:
            out.add_(bias)
        if x.dtype != torch.float32:
            out = out.to(x.dtype)
        return out if x.dim() == 2 else out.view(*x.shape[:-1], self.out_features)

    def _gemm(self, x: torch.Tensor, out: torch.Tensor) -> None:
        raise NotImplementedError

    def rows(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Rows `ids` of the matrix (an embedding lookup): [..., K]."""
        return self._values(ids.reshape(-1)).view(*ids.shape, self.in_features).to(dtype)

    def dequantize(self) -> torch.Tensor:
        return self._values(None)

    def _values(self, ids: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError


class NativeInt8(_NativeMatrix):
    """w = q * scale + min per group along K; q uint8 [N, K], scales / mins fp32 [N, K / group]."""

    ROW_TENSORS = ("qweight", "scales", "mins")

    def __init__(self, lib: QGemmLibrary, qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor,
                 group_size: int, dequant_rows: int = DEQUANT_ROWS) -> None:
        self.lib, self.group_size, self.dequant_rows = lib, group_size, dequant_rows
        self.out_features, self.in_features = qweight.shape
        self.qweight = qweight.to(torch.uint8).contiguous()
        self.scales = scales.float().contiguous()
        self.mins = mins.float().contiguous()

    def _gemm(self, x: torch.Tensor, out: torch.Tensor) -> None:
        self.lib.gemm_u8g(x, self.qweight, self.scales, self.mins, self.group_size, out)

    def _values(self, ids: torch.Tensor | None) -> torch.Tensor:
        q, scales, mins = (self.qweight, self.scales, self.mins) if ids is None else \
            (self.qweight[ids], self.scales[ids], self.mins[ids])
        n, groups = q.shape[0], self.in_features // self.group_size
        w = q.view(n, groups, self.group_size).float() * scales[..., None] + mins[..., None]
        return w.view(n, self.in_features)

    def nbytes(self) -> int:
        return self.qweight.numel() + 4 * (self.scales.numel() + self.mins.numel())


class NativeInt4(_NativeMatrix):
    """w = q * scale + min per group along K, q in [0, 15] repacked in blocks of INT4_BLOCK (see
    qgemm.cpp); scales / mins held fp16 (the kernel widens them with F16C)."""

    ROW_TENSORS = ("packed", "scales", "mins")

    def __init__(self, lib: QGemmLibrary, qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor,
                 group_size: int, dequant_rows: int = DEQUANT_ROWS) -> None:
        self.lib, self.group_size, self.dequant_rows = lib, group_size, dequant_rows
        q = unpack_int4(qweight)
        self.out_features, self.in_features = q.shape
        blocks = q.view(self.out_features, self.in_features // INT4_BLOCK, 2, INT4_BLOCK // 2)
        self.packed = (blocks[:, :, 0] | (blocks[:, :, 1] << 4)).reshape(self.out_features, -1).contiguous()
        self.scales = scales.to(torch.float16).contiguous()
        self.mins = mins.to(torch.float16).contiguous()

    def _gemm(self, x: torch.Tensor, out: torch.Tensor) -> None:
        self.lib.gemm_u4g(x, self.packed, self.scales, self.mins, self.group_size, out)

    def _values(self, ids: torch.Tensor | None) -> torch.Tensor:
        packed, scales, mins = (self.packed, self.scales, self.mins) if ids is None else \
            (self.packed[ids], self.scales[ids], self.mins[ids])
        n, groups = packed.shape[0], self.in_features // self.group_size
        blocks = packed.view(n, self.in_features // INT4_BLOCK, INT4_BLOCK // 2)
        q = torch.stack((blocks & 0xF, blocks >> 4), dim=2).view(n, groups, self.group_size).float()
        return (q * scales.float()[..., None] + mins.float()[..., None]).view(n, self.in_features)

    def nbytes(self) -> int:
        return self.packed.numel() + 2 * (self.scales.numel() + self.mins.numel())


class NativeInt8Channel(_NativeMatrix):
    """w = q * scale[n]; q int8 [N, K] in [-127, 127], one fp32 scale per output row."""

    ROW_TENSORS = ("qweight", "scales")

    def __init__(self, lib: QGemmLibrary, qweight: torch.Tensor, scales: torch.Tensor,
                 dequant_rows: int = DEQUANT_ROWS) -> None:
        self.lib, self.dequant_rows = lib, dequant_rows
        self.out_features, self.in_features = qweight.shape
        self.qweight = qweight.to(torch.int8).contiguous()
        self.scales = scales.float().contiguous()

    def _gemm(self, x: torch.Tensor, out: torch.Tensor) -> None:
        self.lib.gemm_i8c(x, self.qweight, self.scales, out)

    def _values(self, ids: torch.Tensor | None) -> torch.Tensor:
        q, scales = (self.qweight, self.scales) if ids is None else (self.qweight[ids], self.scales[ids])
        return q.float() * scales[:, None]

    def nbytes(self) -> int:
        return self.qweight.numel() + 4 * self.scales.numel()


def native_shape_fits(kind: str, shape: tuple[int, int], group_size: int) -> bool:
    """Whether the native kernels take a matrix of this kind and shape (K in whole 8-weight chunks,
    int4 groups in whole packed blocks); the others stay on torch's kernels."""
    _, cols = shape
    if kind == "int4":
        return group_size % INT4_BLOCK == 0 and cols % group_size == 0
    if kind == "int8":
        return group_size % 8 == 0 and cols % group_size == 0
    return cols % 8 == 0


def stackable(matrices: list) -> bool:
    """Whether `matrices` can share one kernel call stacked by output row: all native, of one kind, input
    width and group size."""
    first = matrices[0]
    return isinstance(first, _NativeMatrix) and all(
        type(m) is type(first) and m.in_features == first.in_features
        and getattr(m, "group_size", None) == getattr(first, "group_size", None) for m in matrices)


def fuse_rows(matrices: list[_NativeMatrix]) -> _NativeMatrix:
    """One matrix whose rows are `matrices`' rows in order (q, k, v stacked: one kernel call for all three);
    they must be `stackable`. The members' tensors become row views of the fused ones, so the fusion
    holds no extra bytes and a member called alone still computes from its own rows."""
    if not stackable(matrices):
        raise ValueError("these quantized matrices cannot share one kernel call (kinds, widths or groups differ)")
    first = matrices[0]
    fused = copy.copy(first)
    fused.out_features = sum(m.out_features for m in matrices)
    for name in first.ROW_TENSORS:
        setattr(fused, name, torch.cat([getattr(m, name) for m in matrices]))
    start = 0
    for member in matrices:
        for name in first.ROW_TENSORS:
            setattr(member, name, getattr(fused, name)[start:start + member.out_features])  # contiguous rows
        start += member.out_features
    return fused
