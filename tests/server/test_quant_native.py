"""The native CPU kernels (server/engine/native/qgemm.cpp) against the reference dequantized matmul, in
float64, on shapes that exercise every register block and tail: rows of x 1..9 and past the blocks,
output rows that are not a multiple of any block, groups longer than one chunk."""

from __future__ import annotations

import platform
import shutil
from pathlib import Path

import pytest
import torch

from adapters.quantized import dequantize, quantize_int4, quantize_int8, quantize_int8_channel
from server.engine.native import qgemm_library
from server.engine.quant_kernels import QuantKernels, quant_kernels_for
from server.engine.quant_native import NativeInt4, NativeInt8, NativeInt8Channel, native_shape_fits

FP32_TOLERANCE = 1e-5  # relative to the output's scale: fp32 products, summed in another order


def _native_expected() -> bool:
    """Where the kernels must build: x86-64 with AVX2, F16C and FMA, and a C++ compiler (every CI machine)."""
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    has_isa = all(f" {flag}" in flags for flag in ("avx2", "f16c", "fma"))
    return platform.machine() in ("x86_64", "AMD64") and has_isa and bool(shutil.which("c++") or shutil.which("g++"))


def _has_avx512() -> bool:
    return Path("/proc/cpuinfo").exists() and " avx512f" in Path("/proc/cpuinfo").read_text()


@pytest.fixture(scope="module", params=["native", "avx2"])
def lib(request):
    """The build this machine serves with, and (where that is the AVX-512 form) the AVX2 form beside it."""
    library = qgemm_library()
    if library is None:
        if _native_expected():
            pytest.fail("the native kernels did not build on a machine that has everything they need (see the log)")
        pytest.skip("no AVX2 x86-64 CPU or no C++ compiler: the torch kernels serve instead")
    if request.param == "native":
        assert library.vector_width == (16 if _has_avx512() else 8)
        return library
    if library.vector_width == 8:
        pytest.skip("this machine's build is the AVX2 form already (the 'native' cases)")
    avx2 = qgemm_library(force_avx2=True)
    assert avx2 is not None and avx2.vector_width == 8
    return avx2


def _make(kind: str, lib, weight: torch.Tensor, group: int):
    if kind == "int8":
        tensors = quantize_int8(weight, group)
        return NativeInt8(lib, **tensors, group_size=group), dequantize("int8", tensors, group)
    if kind == "int4":
        tensors = quantize_int4(weight, group)
        # the kernel holds scales and mins in fp16: the reference reads the same rounded values
        rounded = {**tensors, "scales": tensors["scales"].half().float(), "mins": tensors["mins"].half().float()}
        return NativeInt4(lib, **tensors, group_size=group), dequantize("int4", rounded, group)
    tensors = quantize_int8_channel(weight)
    return NativeInt8Channel(lib, **tensors), dequantize("int8_channel", tensors)


def _relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got.double() - expected).abs().max() / expected.abs().max())


@pytest.mark.parametrize("kind,group", [("int8", 64), ("int8", 32), ("int4", 32), ("int4", 64), ("int8_channel", 0)])
@pytest.mark.parametrize("out_features", [1, 7, 45, 192])
def test_every_row_count_equals_the_dequantized_reference(lib, kind, group, out_features):
    generator = torch.Generator().manual_seed(out_features)
    weight = torch.randn(out_features, 128, generator=generator) * 0.05
    matrix, reference = _make(kind, lib, weight, group)
    torch.testing.assert_close(matrix.dequantize(), reference, rtol=0, atol=1e-6)
    for rows in (1, 2, 3, 4, 5, 6, 7, 8, 9, 13, 17, matrix.dequant_rows - 1, matrix.dequant_rows + 3):
        x = torch.randn(rows, 128, generator=generator)
        got = matrix.matmul(x, None)
        assert got.shape == (rows, out_features) and got.dtype == torch.float32
        assert _relative_error(got, x.double() @ reference.double().t()) < FP32_TOLERANCE, rows


@pytest.mark.parametrize("kind", ["int8", "int4", "int8_channel"])
def test_bias_leading_dims_other_dtypes_and_embedding_rows(lib, kind):
    generator = torch.Generator().manual_seed(1)
    weight = torch.randn(96, 64, generator=generator)
    matrix, reference = _make(kind, lib, weight, 32)
    bias = torch.randn(96, generator=generator)
    x = torch.randn(2, 3, 64, generator=generator)
    expected = x.double() @ reference.double().t() + bias.double()
    assert _relative_error(matrix.matmul(x, bias), expected) < FP32_TOLERANCE
    x_bf16 = x.bfloat16()
    got = matrix.matmul(x_bf16, bias)
    assert got.dtype == torch.bfloat16 and got.shape == (2, 3, 96)
    assert _relative_error(got, x_bf16.double() @ reference.double().t() + bias.double()) < 1e-2
    transposed = torch.randn(64, 5, generator=generator).t()  # a non-contiguous view is read correctly
    assert _relative_error(matrix.matmul(transposed, None), transposed.double() @ reference.double().t()) < FP32_TOLERANCE
    ids = torch.tensor([[0, 31, 95], [16, 17, 40]])
    torch.testing.assert_close(matrix.rows(ids, torch.float32), reference[ids], rtol=0, atol=1e-6)


def test_threads_split_the_rows_without_changing_the_result(lib):
    generator = torch.Generator().manual_seed(2)
    matrix, _ = _make("int8", lib, torch.randn(1000, 256, generator=generator), 64)
    x = torch.randn(3, 256, generator=generator)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = matrix.matmul(x, None)
        torch.set_num_threads(2)
        two = matrix.matmul(x, None)
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(one, two, rtol=0, atol=0)  # each output is one thread's own dot product


def test_shapes_the_kernels_do_not_take_stay_on_torch(lib):
    """The row-block kernels step one k at a time: any K in whole groups (int4 groups in whole bytes) and
    any N (padded to whole blocks) is native; a K that groups do not divide stays on torch's kernels."""
    assert native_shape_fits("int4", (64, 128), 32) and native_shape_fits("int8_channel", (45, 100), 0)
    assert not native_shape_fits("int4", (64, 100), 32) and not native_shape_fits("int8", (64, 100), 64)
    generator = torch.Generator().manual_seed(3)
    weight = torch.randn(45, 100, generator=generator)
    matrix = NativeInt8Channel(lib, **quantize_int8_channel(weight))
    reference = dequantize("int8_channel", quantize_int8_channel(weight))
    for rows in (1, 5, 8, 11, matrix.dequant_rows + 1):  # the last: the dequantized GEMM
        x = torch.randn(rows, 100, generator=generator)
        assert _relative_error(matrix.matmul(x, None), x.double() @ reference.double().t()) < FP32_TOLERANCE


def test_cpu_int8_and_int4_choose_the_native_kernels(lib):
    assert quant_kernels_for(torch.device("cpu"), "int8").kind == "native"
    assert quant_kernels_for(torch.device("cpu"), "int4").kind == "native"


def test_bytes_per_weight_fit_the_targets(lib):
    weight = torch.randn(256, 512)
    int8, _ = _make("int8", lib, weight, 64)
    int4, _ = _make("int4", lib, weight, 32)
    assert int8.nbytes() == weight.numel() * 1.125  # one byte a weight, fp32 scale and min per 64
    assert int4.nbytes() == weight.numel() * 0.625  # half a byte a weight, fp16 scale and min per 32
