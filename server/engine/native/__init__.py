"""Native CPU kernels (qgemm.cpp): compiled once per process with the machine's C++ compiler, loaded
with ctypes; `qgemm_library()` is None, with the reason logged, where that fails (no compiler, not
x86 with AVX2, a self-test that disagrees), and the callers fall back to torch's kernels.

Compiling for the machine it runs on (`-march=native`) is what makes it fast, so nothing prebuilt
ships; the source is a few hundred lines and builds in about two seconds. `-fopenmp` links libgomp by
its soname, which torch's own libgomp already holds in this process, so both share one thread pool.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("qgemm.cpp")
ABI_VERSION = 3
CXX_FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17")
COMPILE_TIMEOUT_S = 120

_P, _I, _T = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
_SIGNATURES = {
    "lp_gemm_u8g": [_P, _I, _I, _P, _P, _P, _I, _I, _P, _T],
    "lp_gemm_u4g": [_P, _I, _I, _P, _P, _P, _I, _I, _P, _T],
    "lp_gemm_i8c": [_P, _I, _I, _P, _P, _I, _P, _T],
    "lp_dequant_u8g": [_P, _P, _P, _I, _I, _I, _P, _T],
    "lp_dequant_u4g": [_P, _P, _P, _I, _I, _I, _P, _T],
    "lp_dequant_i8c": [_P, _P, _I, _I, _P, _T],
}


class NativeBuildError(RuntimeError):
    pass


@dataclass(frozen=True)
class QGemmLibrary:
    """The compiled kernels; every call takes contiguous CPU tensors (checked by the callers' types)."""

    lib: ctypes.CDLL
    compiler: str
    vector_width: int  # floats per vector the kernels were built for: 8 (AVX2) or 16 (AVX-512)

    def gemm_u8g(self, x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, group: int,
                 out: torch.Tensor) -> None:
        self.lib.lp_gemm_u8g(x.data_ptr(), x.shape[0], x.shape[1], q.data_ptr(), scales.data_ptr(), mins.data_ptr(),
                             out.shape[1], group, out.data_ptr(), torch.get_num_threads())

    def gemm_u4g(self, x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, group: int,
                 out: torch.Tensor) -> None:
        self.lib.lp_gemm_u4g(x.data_ptr(), x.shape[0], x.shape[1], q.data_ptr(), scales.data_ptr(), mins.data_ptr(),
                             out.shape[1], group, out.data_ptr(), torch.get_num_threads())

    def gemm_i8c(self, x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, out: torch.Tensor) -> None:
        self.lib.lp_gemm_i8c(x.data_ptr(), x.shape[0], x.shape[1], q.data_ptr(), scales.data_ptr(), out.shape[1],
                             out.data_ptr(), torch.get_num_threads())


    def dequant_u8g(self, q: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, n: int, k: int, group: int,
                    out: torch.Tensor) -> None:
        """out fp32 [K, N padded to whole blocks]: the matrix transposed (for one fp32 GEMM)."""
        self.lib.lp_dequant_u8g(q.data_ptr(), scales.data_ptr(), mins.data_ptr(), n, k, group, out.data_ptr(),
                                torch.get_num_threads())

    def dequant_u4g(self, q: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, n: int, k: int, group: int,
                    out: torch.Tensor) -> None:
        self.lib.lp_dequant_u4g(q.data_ptr(), scales.data_ptr(), mins.data_ptr(), n, k, group, out.data_ptr(),
                                torch.get_num_threads())

    def dequant_i8c(self, q: torch.Tensor, scales: torch.Tensor, n: int, k: int, out: torch.Tensor) -> None:
        self.lib.lp_dequant_i8c(q.data_ptr(), scales.data_ptr(), n, k, out.data_ptr(), torch.get_num_threads())


def _compiler() -> str:
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if not cxx:
        raise NativeBuildError("no C++ compiler (set CXX or install g++)")
    return cxx


def _build(cxx: str, folder: Path, force_avx2: bool) -> Path:
    target = folder / "qgemm.so"
    cmd = [cxx, *CXX_FLAGS, *(("-DLP_FORCE_AVX2",) if force_avx2 else ()), "-o", str(target), str(SOURCE)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise NativeBuildError(f"{cxx} did not run: {exc}") from exc
    if done.returncode != 0:
        first = next((line for line in done.stderr.splitlines() if "error" in line), done.stderr.strip()[:200])
        raise NativeBuildError(f"{cxx} failed: {first}")
    return target


def _load(path: Path, cxx: str) -> QGemmLibrary:
    lib = ctypes.CDLL(str(path))
    if lib.lp_abi_version() != ABI_VERSION:
        raise NativeBuildError("qgemm.so answers another ABI version")
    for name, argtypes in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = argtypes, None
    return QGemmLibrary(lib, cxx, lib.lp_vector_width())


@functools.cache
def qgemm_library(force_avx2: bool = False) -> QGemmLibrary | None:
    """The kernels for this machine, built on first use; None (logged once) where they cannot be.
    `force_avx2`: the AVX2 form even where the machine has AVX-512 (tests check both forms)."""
    try:
        cxx = _compiler()
        with tempfile.TemporaryDirectory(prefix="loraplex-native-") as tmp:
            library = _load(_build(cxx, Path(tmp), force_avx2), cxx)  # the mapping outlives the file
    except (NativeBuildError, OSError) as exc:
        log.warning("native CPU quantization kernels unavailable (%s): using torch's", exc)
        return None
    return library
