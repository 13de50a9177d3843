"""Quantized base matrices on the native CPU kernels (server/engine/native/qgemm.cpp).

Same checkpoint tensors as the torch kinds in quant_kernels.py, repacked once at load into row blocks
(to_blocks); activations stay in fp32 end to end (x in another dtype is widened for the base matmul and
the result cast back). Chunks of DEQUANT_ROWS rows and more (long prefills) dequantize the matrix into a
scratch fp32 buffer with one native pass and run one fp32 GEMM instead: `python benchmarks/bench_quant.py
--kernels --kernel-rows 8,32,64,128` on this project's AVX-512 Xeon (2026-12-05), a pass over
SmolLM2-135M's matrices: native int8 19 / 81 / 101 / 181 ms at 8 / 32 / 64 / 128 rows, the dequantized
GEMM 98 / 156 / 159 / 217 ms (native int4 241 ms at 128 rows): the two meet near 128 rows.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from adapters.quantized import unpack_int4
from server.engine.native import QGemmLibrary

DEQUANT_ROWS = 128  # rows (tokens) from which dequantize + one fp32 GEMM beats the native kernels


def _fp32_rows(x: torch.Tensor) -> torch.Tensor:
    flat = x.reshape(-1, x.shape[-1])
    return flat if flat.dtype == torch.float32 and flat.is_contiguous() else flat.float().contiguous()


def to_blocks(t: torch.Tensor, width: int) -> torch.Tensor:
    """[N, C] -> [ceil(N / width), C, width]: rows in blocks of `width`, interleaved along C, zero-padded
    (qgemm.cpp's row-block layout: one vector load reads `width` rows' values at one column)."""
    rows, cols = t.shape
    padded = -(-rows // width) * width
    if padded != rows:
        t = torch.cat([t, t.new_zeros(padded - rows, cols)])
    return t.reshape(padded // width, width, cols).transpose(1, 2).contiguous()


def from_blocks(blocks: torch.Tensor, rows: int, ids: torch.Tensor | None) -> torch.Tensor:
    """`to_blocks` undone: rows `ids` ([n, C]), or all `rows` of them ([rows, C])."""
    width = blocks.shape[-1]
    if ids is None:
        return blocks.transpose(1, 2).reshape(-1, blocks.shape[1])[:rows]
    return blocks[ids // width, :, ids % width]


class _NativeMatrix:
    """A quant_kernels.QuantMatrix (structurally) whose small-row products run in qgemm.cpp.

    Every kind stores its tensors in blocks of `lib.vector_width` output rows (to_blocks), leading
    dimension first: `ROW_TENSORS` names them, and rows lo:hi of the matrix, for lo and hi whole blocks,
    are a contiguous slice of each (what `fuse_rows` relies on)."""

    ROW_TENSORS: tuple[str, ...]
    out_features: int
    in_features: int
    lib: QGemmLibrary
    dequant_rows: int

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        flat = _fp32_rows(x)
        if flat.shape[0] >= self.dequant_rows:  # a long prefill chunk: one fp32 GEMM on the dequantized matrix
            blocks = self.ROW_TENSORS[0]
            transposed = torch.empty(self.in_features, getattr(self, blocks).shape[0] * self.lib.vector_width)
            self._dequant_t(transposed)
            out = flat @ transposed
            if out.shape[1] != self.out_features:
                out = out[:, : self.out_features].contiguous()
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

    def _dequant_t(self, out: torch.Tensor) -> None:
        """out fp32 [K, N padded to whole blocks] = the matrix transposed (qgemm.cpp's dequant_t)."""
        raise NotImplementedError

    def rows(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Rows `ids` of the matrix (an embedding lookup): [..., K]."""
        return self._values(ids.reshape(-1)).view(*ids.shape, self.in_features).to(dtype)

    def dequantize(self) -> torch.Tensor:
        return self._values(None)

    def _values(self, ids: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def nbytes(self) -> int:
        return sum(getattr(self, name).numel() * getattr(self, name).element_size() for name in self.ROW_TENSORS)


class NativeInt8(_NativeMatrix):
    """w = q * scale + min per group along K; q uint8 [N, K], scales / mins fp32 [N, K / group], held in
    row blocks."""

    ROW_TENSORS = ("qweight", "scales", "mins")

    def __init__(self, lib: QGemmLibrary, qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor,
                 group_size: int, dequant_rows: int = DEQUANT_ROWS) -> None:
        self.lib, self.group_size, self.dequant_rows = lib, group_size, dequant_rows
        self.out_features, self.in_features = qweight.shape
        width = lib.vector_width
        self.qweight = to_blocks(qweight.to(torch.uint8), width)
        self.scales = to_blocks(scales.float(), width)
        self.mins = to_blocks(mins.float(), width)

    def _gemm(self, x: torch.Tensor, out: torch.Tensor) -> None:
        self.lib.gemm_u8g(x, self.qweight, self.scales, self.mins, self.group_size, out)

    def _dequant_t(self, out: torch.Tensor) -> None:
        self.lib.dequant_u8g(self.qweight, self.scales, self.mins, self.out_features, self.in_features,
                             self.group_size, out)

    def _values(self, ids: torch.Tensor | None) -> torch.Tensor:
        q, scales, mins = (from_blocks(t, self.out_features, ids) for t in (self.qweight, self.scales, self.mins))
        n, groups = q.shape[0], self.in_features // self.group_size
        w = q.reshape(n, groups, self.group_size).float() * scales[..., None] + mins[..., None]
        return w.view(n, self.in_features)


class NativeInt4(_NativeMatrix):
    """w = q * scale + min per group along K, q in [0, 15]: two of them a byte (k = 2p low, 2p + 1 high),
    held in row blocks; scales / mins held fp16 (the kernel widens them with F16C)."""

    ROW_TENSORS = ("packed", "scales", "mins")

    def __init__(self, lib: QGemmLibrary, qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor,
                 group_size: int, dequant_rows: int = DEQUANT_ROWS) -> None:
        self.lib, self.group_size, self.dequant_rows = lib, group_size, dequant_rows
        q = unpack_int4(qweight)
        self.out_features, self.in_features = q.shape
        width = lib.vector_width
        self.packed = to_blocks((q[:, 0::2] | (q[:, 1::2] << 4)).to(torch.uint8), width)
        self.scales = to_blocks(scales.to(torch.float16), width)
        self.mins = to_blocks(mins.to(torch.float16), width)

    def _gemm(self, x: torch.Tensor, out: torch.Tensor) -> None:
        self.lib.gemm_u4g(x, self.packed, self.scales, self.mins, self.group_size, out)

    def _dequant_t(self, out: torch.Tensor) -> None:
        self.lib.dequant_u4g(self.packed, self.scales, self.mins, self.out_features, self.in_features,
                             self.group_size, out)

    def _values(self, ids: torch.Tensor | None) -> torch.Tensor:
        packed, scales, mins = (from_blocks(t, self.out_features, ids) for t in (self.packed, self.scales, self.mins))
        n, groups = packed.shape[0], self.in_features // self.group_size
        q = torch.stack((packed & 0xF, packed >> 4), dim=-1).reshape(n, groups, self.group_size).float()
        return (q * scales.float()[..., None] + mins.float()[..., None]).view(n, self.in_features)


class NativeInt8Channel(_NativeMatrix):
    """w = q * scale[n]; q int8 [N, K] in [-127, 127] held in row blocks, one fp32 scale per output row
    (padded to whole blocks)."""

    ROW_TENSORS = ("qweight", "scales")

    def __init__(self, lib: QGemmLibrary, qweight: torch.Tensor, scales: torch.Tensor,
                 dequant_rows: int = DEQUANT_ROWS) -> None:
        self.lib, self.dequant_rows = lib, dequant_rows
        self.out_features, self.in_features = qweight.shape
        width = lib.vector_width
        self.qweight = to_blocks(qweight.to(torch.int8), width)
        self.scales = to_blocks(scales.float()[:, None], width).reshape(-1)

    def _gemm(self, x: torch.Tensor, out: torch.Tensor) -> None:
        self.lib.gemm_i8c(x, self.qweight, self.scales, out)

    def _dequant_t(self, out: torch.Tensor) -> None:
        self.lib.dequant_i8c(self.qweight, self.scales, self.out_features, self.in_features, out)

    def _values(self, ids: torch.Tensor | None) -> torch.Tensor:
        q = from_blocks(self.qweight, self.out_features, ids)
        scales = self.scales[: self.out_features] if ids is None else self.scales[ids]
        return q.float() * scales[:, None]


def native_shape_fits(kind: str, shape: tuple[int, int], group_size: int) -> bool:
    """Whether the native kernels take a matrix of this kind and shape (K in whole groups of an even
    size); the others stay on torch's kernels."""
    _, cols = shape
    if kind == "int4":
        return group_size % 2 == 0 and cols % group_size == 0
    if kind == "int8":
        return group_size % 2 == 0 and cols % group_size == 0
    return True


def stackable(matrices: list) -> bool:
    """Whether `matrices` can share one kernel call stacked by output row: all native, of one kind, input
    width and group size, each a whole number of row blocks."""
    first = matrices[0]
    return isinstance(first, _NativeMatrix) and all(
        type(m) is type(first) and m.in_features == first.in_features and m.out_features % m.lib.vector_width == 0
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
            tensor = getattr(fused, name)
            per = fused.out_features // tensor.shape[0]  # rows per leading entry: a block's, or 1
            setattr(member, name, tensor[start // per:(start + member.out_features) // per])  # contiguous
        start += member.out_features
    return fused
