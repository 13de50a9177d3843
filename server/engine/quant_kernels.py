"""Quantized base matrices: what a LoraLinear's base matmul runs on under `--quant int8|int4|nf4|fp4`.

Every kind holds only its quantized form (the full-precision weight is dropped once it is made) and
answers `matmul(x [..., K], bias) -> [..., N]` in x's dtype; the adapters' deltas are added after, in
the activation dtype, as on a full-precision base. `dequantize()` is the fp32 matrix it stands for.

Which kernel serves which mode is decided once, by `quant_kernels_for(device, quant)`:

    CPU  int8  native u8g (server/engine/native/qgemm.cpp)  8-bit, asymmetric, groups of 64 along K,
                                                          fp32 activations (NativeInt8)
         int4  native u4g                                 4-bit, asymmetric, groups of 32 along K,
                                                          fp16 scales and mins (NativeInt4)
         int8_channel matrices (the tied embedding/head where groups do not fit): native i8c
         where the native kernels cannot be built (no C++ compiler, no AVX2):
         int8  torch's `_weight_int4pack_mm_for_cpu`, twice (two 4-bit halves, TorchInt8); matrices that
               do not pack: `_weight_int8pack_mm`, one scale per output row (TorchInt8Channel)
         int4  torch's `_weight_int4pack_mm_for_cpu`    4-bit, asymmetric, groups of 32 along K
         nf4 / fp4  bitsandbytes `Linear4bit`           what `training qlora` trains against (exact)
    CUDA int8  bitsandbytes LLM.int8 (`Linear8bitLt`)
         int4 / nf4  bitsandbytes NF4, double quantization; fp4 bitsandbytes FP4

Why the native kernels on CPU: the sweep `python benchmarks/bench_quant.py --kernels` (one pass over all
211 of SmolLM2-135M's weight matrices, at 1 / 8 rows of x; medians of 5 interleaved passes). On this
project's 2-core AVX-512 Xeon (AMX-BF16, so bf16 runs oneDNN's AMX kernels), after the row-block rewrite
of qgemm.cpp (2026-12-05): fp32 (oneDNN, packed) 29 / 36 ms, bf16 19 / 18 ms, torch's int4 kernel
9.3 / 25.5 ms and its two-halves int8 17.6 / 45.8 ms (both fed bf16 activations), native int8
12.6 / 18.2 ms, native int4 9.2 / 16.2 ms (fp32 activations). On the 2-core AVX2 Zen 1 machine the
project ran on before (the earlier row-major kernels): fp32 44 / 64-73 ms, bf16 F.linear 59 / 244 ms,
torch int4 31 / 88-121 ms, native int8 26-34 / 65-68 ms. The torch kernels need bf16 activations (with
fp32 ones they fall to a scalar path), which cost about one point of greedy agreement; the native ones
read fp32 activations and widen the weights in registers, so they are both faster and exact to fp32
rounding.
bitsandbytes on CPU dequantizes per call and was slower than fp32 (measured when the versions were
pinned: 4.4 / 6.0 ms against 3.4 ms for a 1024x1024 layer at 32 rows): it is kept for nf4/fp4
because it is QLoRA's own arithmetic. Every int kernel is compute-bound past a few dozen rows, so
prefill chunks of at least `dequant_rows` rows dequantize the matrix into a scratch fp32 buffer and
run one fp32 matmul instead (one matrix at a time: nothing stays resident).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from adapters.quantized import dequantize as reference_dequantize
from adapters.quantized import unpack_int4
from server.engine.native import qgemm_library
from server.engine.quant_native import NativeInt4, NativeInt8, NativeInt8Channel, native_shape_fits

log = logging.getLogger(__name__)

KERNEL_DTYPE = torch.bfloat16  # the activations the torch int8/int4 CPU kernels are fast on
DEQUANT_ROWS = 256  # rows (tokens) from which a dequantize + fp32 matmul beats the int kernels on CPU
INT4_PACK_TILES = 1  # _convert_weight_to_int4pack_for_cpu's inner_k_tiles argument (CPU ignores its value)
INT4_MIDPOINT = 8  # torch's int4 kernels compute (q - 8) * scale + zero
LLM_INT8_THRESHOLD = 6.0  # bitsandbytes' outlier threshold (LLM.int8 paper and HF's default)
INT4_PACK_BLOCKS = (32, 64)  # output rows per block of torch's int4 CPU packing: 32 on AVX2, 64 on AVX-512


class QuantMatrix(Protocol):
    out_features: int
    in_features: int

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor: ...

    def dequantize(self) -> torch.Tensor: ...

    def nbytes(self) -> int: ...


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


def _add_bias(out: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return out if bias is None else out.add_(bias)


class TorchInt8Channel(QuantMatrix):
    """w = qweight * scales[:, None]; int8 [N, K], scales [N]: torch's `_weight_int8pack_mm`, for matrices
    whose shapes do not divide into the group kernels' blocks."""

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor) -> None:
        self.qweight = qweight.contiguous()
        self.out_features, self.in_features = qweight.shape
        self.scales = scales.float().contiguous()  # applied in fp32 after the kernel (bf16 would round them)
        self._ones = torch.ones(self.out_features, dtype=KERNEL_DTYPE, device=qweight.device)

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        flat = _flat(x)
        if flat.shape[0] >= DEQUANT_ROWS:
            out = F.linear(flat, self.dequantize().to(x.dtype))
        else:
            out = torch.ops.aten._weight_int8pack_mm(flat.to(KERNEL_DTYPE), self.qweight, self._ones)
            out = out.to(x.dtype).mul_(self.scales.to(x.dtype))
        return _add_bias(out, bias).view(*x.shape[:-1], self.out_features)

    def dequantize(self) -> torch.Tensor:
        return reference_dequantize("int8_channel", {"qweight": self.qweight, "scales": self.scales})

    def rows(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Rows `ids` of the matrix (an embedding lookup): [..., K]."""
        return self.qweight[ids].to(dtype) * self.scales[ids, None].to(dtype)

    def nbytes(self) -> int:
        return self.qweight.numel() + self.scales.numel() * 4


class PackedInt4:
    """q [N, K] in [0, 15] with one (scale, zero) per group, packed once for `_weight_int4pack_mm_for_cpu`,
    which computes x @ ((q - 8) * scale + zero).T.

    The packed layout (read off `_convert_weight_to_int4pack_for_cpu`): blocks of `block_n` output rows
    (32 on AVX2, 64 on AVX-512: `int4_pack_block`); block b holds bytes [K, block_n / 2], byte [k, j] =
    q[b * block_n + j, k] | q[b * block_n + block_n / 2 + j, k] << 4. `values` reads rows back from it
    (embedding lookups, long prefill chunks); where the layout is not one of those (or `layout_known` is
    False), q itself is kept beside it."""

    def __init__(self, q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
                 layout_known: bool) -> None:
        self.out_features, self.in_features = q.shape
        self.group_size = group_size
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), INT4_PACK_TILES)
        # [K / group, N, 2]: (scale, zero) as the kernel reads them
        self.scales_zeros = torch.stack((scales.float(), zeros.float()), dim=-1).transpose(0, 1).contiguous().to(KERNEL_DTYPE)
        self.block_n = int4_pack_block() if layout_known else None
        if self.block_n is not None and self.out_features % self.block_n:
            self.block_n = None
        self.kept_q = None if self.block_n is not None else q.to(torch.uint8).contiguous()

    def mm(self, flat: torch.Tensor) -> torch.Tensor:  # [M, K] -> [M, N] in bf16
        return torch.ops.aten._weight_int4pack_mm_for_cpu(flat.to(KERNEL_DTYPE), self.packed, self.group_size,
                                                          self.scales_zeros)

    def values(self, ids: torch.Tensor | None = None) -> torch.Tensor:
        """fp32 (q - 8) * scale + zero of rows `ids` ([..., K]), or of the whole matrix ([N, K])."""
        rows, cols = self.out_features, self.in_features
        flat_ids = None if ids is None else ids.reshape(-1)
        if self.kept_q is not None:
            q = self.kept_q if flat_ids is None else self.kept_q[flat_ids]
        elif flat_ids is None:
            blocks = self.packed.view(rows // self.block_n, cols, self.block_n // 2)
            q = torch.cat((blocks & 0xF, blocks >> 4), dim=-1).transpose(1, 2).reshape(rows, cols)
        else:
            blocks = self.packed.view(rows // self.block_n, cols, self.block_n // 2)
            half = self.block_n // 2
            byte = blocks[flat_ids // self.block_n, :, flat_ids % half]  # [n, K]
            q = torch.where(((flat_ids % self.block_n) >= half)[:, None], byte >> 4, byte & 0xF)
        sz = self.scales_zeros.float()  # [K / g, N, 2]
        if flat_ids is not None:
            sz = sz[:, flat_ids]
        scale, zero = sz[..., 0].t()[..., None], sz[..., 1].t()[..., None]  # [n, K / g, 1]
        n = q.shape[0]
        w = (q.view(n, cols // self.group_size, self.group_size).float() - INT4_MIDPOINT) * scale + zero
        w = w.view(n, cols)
        return w if ids is None else w.view(*ids.shape, cols)

    def nbytes(self) -> int:
        kept = 0 if self.kept_q is None else self.kept_q.numel()
        return self.packed.numel() + self.scales_zeros.numel() * self.scales_zeros.element_size() + kept


@functools.cache
def int4_pack_block() -> int | None:
    """The output rows per block of `_convert_weight_to_int4pack_for_cpu` on this CPU (it follows the
    vector width torch dispatches to), read off a packed probe; None if no known layout matches."""
    rows = max(INT4_PACK_BLOCKS) * 2
    q = torch.arange(rows * 16, dtype=torch.int32).view(rows, 16) % 16
    q = (q + torch.arange(rows, dtype=torch.int32)[:, None]) % 16  # rows differ, so a wrong order shows
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, INT4_PACK_TILES)
    for block in INT4_PACK_BLOCKS:
        if packed.numel() != rows * 16 // 2:
            break
        blocks = packed.view(rows // block, 16, block // 2)
        if torch.equal(torch.cat((blocks & 0xF, blocks >> 4), dim=-1).transpose(1, 2).reshape(rows, 16).int(), q):
            return block
    return None


class _GroupKernel(QuantMatrix):
    """Shared by the group-wise kinds: the packed parts' sum is the matrix."""

    parts: tuple[PackedInt4, ...]
    dequant_rows: int

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        flat = _flat(x)
        if flat.shape[0] >= self.dequant_rows:
            out = F.linear(flat, self.dequantize().to(x.dtype))
        else:
            out = self.parts[0].mm(flat).to(x.dtype)
            for part in self.parts[1:]:
                out.add_(part.mm(flat).to(x.dtype))
        return _add_bias(out, bias).view(*x.shape[:-1], self.out_features)

    def rows(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        out = self.parts[0].values(ids)
        for part in self.parts[1:]:
            out = out + part.values(ids)
        return out.to(dtype)

    def dequantize(self) -> torch.Tensor:
        out = self.parts[0].values()
        for part in self.parts[1:]:
            out = out + part.values()
        return out

    def nbytes(self) -> int:
        return sum(part.nbytes() for part in self.parts)


class TorchInt4(_GroupKernel):
    """w = q * scale + min per group of `group_size` along K: one packed int4 matrix, zero = min + 8 * scale."""

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, group_size: int,
                 dequant_rows: int = DEQUANT_ROWS, layout_known: bool = True) -> None:
        q = unpack_int4(qweight)
        self.out_features, self.in_features = q.shape
        self.dequant_rows = dequant_rows
        zeros = mins.float() + INT4_MIDPOINT * scales.float()
        self.parts = (PackedInt4(q, scales, zeros, group_size, layout_known),)


class TorchInt8(_GroupKernel):
    """w = q * scale + min per group, q in [0, 255], as two int4 matrices: q = 16 * hi + lo, so
    w = ((hi - 8) * 16 scale + min + 136 scale) + ((lo - 8) * scale + 0). Two calls of the int4 kernel
    (torch has no group-wise int8 kernel; its int8 one takes one scale per row, see adapters/quantized.py
    for what that cost in agreement)."""

    HI_ZERO = 16 * INT4_MIDPOINT + INT4_MIDPOINT  # 136: the two parts' midpoints, folded into the high zero

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, group_size: int,
                 dequant_rows: int = DEQUANT_ROWS, layout_known: bool = True) -> None:
        self.out_features, self.in_features = qweight.shape
        self.dequant_rows = dequant_rows
        scales = scales.float()
        hi = PackedInt4(qweight >> 4, 16 * scales, mins.float() + self.HI_ZERO * scales, group_size, layout_known)
        lo = PackedInt4(qweight & 0xF, scales, torch.zeros_like(scales), group_size, layout_known)
        self.parts = (hi, lo)


class BnbMatrix(QuantMatrix):
    """A bitsandbytes layer (Linear4bit NF4/FP4, or Linear8bitLt on CUDA) made from a full-precision weight,
    built exactly as `training qlora` builds its base (Params4bit defaults: blocksize 64, double
    quantization of the scales), so a QLoRA adapter sees the numbers it was trained on."""

    def __init__(self, weight: torch.Tensor, mode: str, device: torch.device, compute_dtype: torch.dtype) -> None:
        import bitsandbytes as bnb

        self.out_features, self.in_features = weight.shape
        self.mode = mode
        if mode == "llm_int8":
            layer = bnb.nn.Linear8bitLt(self.in_features, self.out_features, bias=False, has_fp16_weights=False,
                                        threshold=LLM_INT8_THRESHOLD)
            layer.weight = bnb.nn.Int8Params(weight.detach().to(torch.float16), requires_grad=False,
                                             has_fp16_weights=False)
        else:
            layer = bnb.nn.Linear4bit(self.in_features, self.out_features, bias=False, compute_dtype=compute_dtype,
                                      quant_type=mode)
            layer.weight = bnb.nn.Params4bit(weight.detach().float(), requires_grad=False, quant_type=mode)
            layer.support_avx512bf16_for_cpu = False  # the kernel training used (training/methods/qlora.py)
        self.layer = layer.to(device).eval().requires_grad_(False)  # quantizes on this move

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return _add_bias(self.layer(x).to(x.dtype), bias)

    def dequantize(self) -> torch.Tensor:
        import bitsandbytes as bnb

        weight = self.layer.weight
        if self.mode == "llm_int8":
            return (weight.CB.float() * weight.SCB.float()[:, None] / 127).float()
        return bnb.functional.dequantize_4bit(weight.data, weight.quant_state).float()

    def nbytes(self) -> int:
        weight = self.layer.weight
        total = weight.data.numel() * weight.data.element_size()
        state = getattr(weight, "quant_state", None)
        if state is not None:
            total += state.absmax.numel() * state.absmax.element_size()
            if state.state2 is not None:
                total += state.state2.absmax.numel() * state.state2.absmax.element_size() + state.state2.code.numel() * 4
        if getattr(weight, "SCB", None) is not None:
            total += weight.SCB.numel() * weight.SCB.element_size()
        return total



@dataclass(frozen=True)
class QuantKernels:
    """The quantized-matrix makers of one mode on one device, chosen once (see the module docstring).

    `from_checkpoint` turns a checkpoint's int8/int4 tensors into matrices (None: this mode does not
    read checkpoints); `from_weight` quantizes a full-precision weight itself (bitsandbytes)."""

    quant: str
    kind: str  # "native" or "torch" (int8 / int4 tensors from adapters.quantized), or "bnb"
    bnb_mode: str = ""  # "nf4" | "fp4" | "llm_int8"
    layout_known: bool = True  # False where the probe found another int4 layout: q is kept beside it

    @property
    def reads_checkpoints(self) -> bool:
        return self.kind in ("native", "torch")

    def from_checkpoint(self, kind: str, tensors: dict[str, torch.Tensor], group_size: int) -> QuantMatrix:
        lib = qgemm_library() if self.kind == "native" else None
        if lib is not None and native_shape_fits(kind, tuple(tensors["qweight"].shape), group_size):
            if kind == "int8_channel":
                return NativeInt8Channel(lib, tensors["qweight"], tensors["scales"])
            cls = NativeInt8 if kind == "int8" else NativeInt4
            return cls(lib, tensors["qweight"], tensors["scales"], tensors["mins"], group_size)
        if kind == "int8_channel":
            return TorchInt8Channel(tensors["qweight"], tensors["scales"])
        cls = TorchInt8 if kind == "int8" else TorchInt4
        return cls(tensors["qweight"], tensors["scales"], tensors["mins"], group_size, layout_known=self.layout_known)

    def from_weight(self, weight: torch.Tensor, device: torch.device, compute_dtype: torch.dtype) -> QuantMatrix:
        return BnbMatrix(weight, self.bnb_mode, device, compute_dtype)


class QuantUnavailableError(ValueError):
    """This machine cannot run the quantization mode asked for (a user error: one line at start-up)."""


QUANT_MODES = ("none", "int8", "int4", "nf4", "fp4")


def quant_kernels_for(device: torch.device, quant: str) -> QuantKernels | None:
    """The kernels of `quant` on `device`, checked on a small probe; QuantUnavailableError if they don't run."""
    if quant == "none":
        return None
    if quant not in QUANT_MODES:
        raise QuantUnavailableError(f"--quant must be one of {', '.join(QUANT_MODES)}, got {quant!r}")
    if device.type == "cuda":
        mode = {"int8": "llm_int8", "int4": "nf4"}.get(quant, quant)
        kernels = QuantKernels(quant, "bnb", mode)
    elif quant in ("nf4", "fp4"):
        kernels = QuantKernels(quant, "bnb", quant)
    else:
        kernels = QuantKernels(quant, "native" if qgemm_library() is not None else "torch")
    if not _probe(kernels, device):
        log.warning("torch's int4 packing differs from the layout this build reads back: the quantized "
                    "values are kept beside the packed ones (more memory)")
        kernels = dataclasses.replace(kernels, layout_known=False)
    return kernels


PROBE_SHAPE = (128, 64)  # out, in: a multiple of every kernel's blocks
PROBE_GROUP = 32
LAYOUT_TOLERANCE = 0.02  # of the probe matrix's largest value
PROBE_TOLERANCE = 0.05  # relative to the output's scale: the probe checks the kernel runs and agrees


def _probe(kernels: QuantKernels, device: torch.device) -> bool:
    """Run the mode's kernel once on a random matrix against the reference dequantized weight; returns
    whether the packed layout reads back as PackedInt4 expects (always true but for the torch kinds)."""
    from adapters.quantized import quantize_int4, quantize_int8

    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(*PROBE_SHAPE, generator=generator)
    x = torch.randn(3, PROBE_SHAPE[1], generator=generator)
    try:
        reference = None
        if kernels.kind == "bnb":
            matrix = kernels.from_weight(weight.to(device), device, torch.float32)
        else:
            tensors = (quantize_int8 if kernels.quant == "int8" else quantize_int4)(weight, PROBE_GROUP)
            matrix = kernels.from_checkpoint(kernels.quant, tensors, PROBE_GROUP)
            reference = reference_dequantize(kernels.quant, tensors, PROBE_GROUP)
        got = matrix.matmul(x.to(device), None).float().cpu()
        expected = x @ (reference if reference is not None else matrix.dequantize().float().cpu()).t()
    except ImportError as exc:
        raise QuantUnavailableError(f"--quant {kernels.quant} needs bitsandbytes on {device.type} "
                                    f"(pip install 'loraplex[qlora]'): {exc}") from exc
    except (RuntimeError, NotImplementedError, AttributeError) as exc:
        raise QuantUnavailableError(f"--quant {kernels.quant} does not run on this {device.type} "
                                    f"with torch {torch.__version__}: {str(exc).splitlines()[0]}") from exc
    error = (got - expected).abs().max().item() / expected.abs().max().item()
    if error > PROBE_TOLERANCE:
        raise QuantUnavailableError(f"--quant {kernels.quant}: this machine's kernel disagrees with the reference "
                                    f"(relative error {error:.3f}); serve with --quant none")
    # the kernel's scales and zeros are bf16: a wrong layout errs by whole quantization levels, not by that
    return reference is None or bool((matrix.dequantize() - reference).abs().max() <= LAYOUT_TOLERANCE * reference.abs().max())



def quant_linear(x: torch.Tensor, matrix: QuantMatrix, bias: torch.Tensor | None) -> torch.Tensor:
    """The LinearFn of a quantized base: x @ dequant(W).T + bias, by the matrix's own kernel."""
    return matrix.matmul(x, bias)
