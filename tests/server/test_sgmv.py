"""The SGMV LoRA kernels vs the loop reference, and the rank-packed pool they read.

The kernels run on CPU under Triton's interpreter, on random shapes (in/out off the block sizes), mixed
ranks (odd ones too), adapter mixes (zipf, distinct, identical, some base-only rows) and both token
layouts (decode: one token per request; prefill: runs of consecutive tokens per request); the gpu-marked
test runs the compiled kernels on CUDA against the same reference.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")

from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

from adapters import LoraWeights  # noqa: E402
from server.engine.kernels import reference, sgmv  # noqa: E402
from server.engine.kernels.lora_pool import LoraPool  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[2]
CHILD_TIMEOUT_S = 300
# triton was imported with TRITON_INTERPRET=1 (the child below, or a whole run under the interpreter):
# the kernels run here on CPU tensors; otherwise only a GPU can run them, and the child does the CPU tests
INTERPRETED = isinstance(triton.language.zeros, InterpretedFunction)
CHILD_SKIP_REASON = "runs in test_cpu_kernels_under_interpreter's child"
needs_interpreter = pytest.mark.skipif(not INTERPRETED, reason=CHILD_SKIP_REASON)
# max |kernel - reference| allowed, relative to max |reference|: float32 dots are IEEE, half ones round
# the shrunk activations and the output to the dtype
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}
RANKS = [5, 8, 13, 16, 33, 64]
MIXES = ["zipf", "distinct", "identical", "with_base"]
MAX_TOKENS = 33
# small shapes off every block size (the interpreter runs each program in Python: these keep it quick)
SMALL_IN, SMALL_OUT = [40, 100], [24, 70]
NUM_SLOTS = 7
EMPTY_SLOT = 6  # never filled: an adapter that skips the module (rank 0 there)


def _run_under_interpreter() -> subprocess.CompletedProcess:
    """This file's CPU tests in a child pytest with TRITON_INTERPRET=1.

    The interpreter has to be on when triton is first imported, not only when a kernel is decorated:
    triton.language's own jit functions (tl.zeros, tl.sum) are compiled or interpreted at that import.
    Here triton is usually imported before this module runs (xgrammar, through the server conftest), and
    switching the whole process to the interpreter would leak into every other test, so the kernels get
    a fresh process. --noconftest: nothing here needs the shared fixtures, and the child skips loading
    transformers and peft."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    command = [sys.executable, "-m", "pytest", "-q", "-rs", "--noconftest", "-p", "no:cacheprovider", "-m", "not gpu",
               str(Path(__file__).resolve())]
    return subprocess.run(command, env=env, cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=CHILD_TIMEOUT_S)


@pytest.mark.skipif(INTERPRETED, reason="this run is already under the interpreter: the kernel tests run here")
def test_cpu_kernels_under_interpreter():
    child = _run_under_interpreter()
    assert child.returncode == 0, f"interpreter run failed:\n{child.stdout[-6000:]}\n{child.stderr[-3000:]}"
    assert CHILD_SKIP_REASON not in child.stdout, f"the child skipped the kernel tests:\n{child.stdout[-3000:]}"


def _weights(rank: int, in_features: int, out_features: int, gen: torch.Generator) -> LoraWeights:
    return LoraWeights(a=torch.randn(rank, in_features, generator=gen) / in_features ** 0.5,
                       b=torch.randn(out_features, rank, generator=gen),
                       scaling=float(torch.rand(1, generator=gen)) + 0.5)


def _pool(in_features: int, out_features: int, dtype: torch.dtype, gen: torch.Generator, rng: random.Random,
          device: str = "cpu") -> LoraPool:
    """Slots 0..5 filled with mixed ranks (one of them odd for sure), slot 6 left empty."""
    pool = LoraPool(NUM_SLOTS, in_features, out_features, device, dtype)
    ranks = [5] + [rng.choice(RANKS) for _ in range(EMPTY_SLOT - 1)]
    for slot in rng.sample(range(EMPTY_SLOT), EMPTY_SLOT):  # out of slot order: offsets are not slot * r
        pool.add(slot, _weights(ranks[slot], in_features, out_features, gen))
    return pool


def _choose(mix: str, requests: int, rng: random.Random) -> list[int]:
    """Each request's slot. `distinct` gives distinct slots while there are enough of them."""
    slots = list(range(NUM_SLOTS))
    if mix == "identical":
        return [rng.randrange(EMPTY_SLOT)] * requests  # a filled slot: an empty one would test nothing
    if mix == "distinct":
        order = rng.sample(slots, len(slots))
        return [order[i % len(order)] for i in range(requests)]
    choices = ([-1] if mix == "with_base" else []) + slots
    weights = [1 / (i + 1) ** 1.5 for i in range(len(choices))]  # zipf-like: the first choice most popular
    return rng.choices(choices, weights=weights, k=requests)


def _token_adapter(mix: str, layout: str, rng: random.Random) -> torch.Tensor:
    if layout == "decode":  # one token per request
        return torch.tensor(_choose(mix, rng.randint(1, MAX_TOKENS), rng))
    requests = rng.randint(1, 5)  # prefill: each request a run of its prompt's tokens
    lengths = [rng.randint(1, MAX_TOKENS // requests) for _ in range(requests)]
    return torch.tensor([s for s, n in zip(_choose(mix, requests, rng), lengths) for _ in range(n)])


def _assert_close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    error = (got.float() - want.float()).abs().max().item() if got.numel() else 0.0
    scale = max(want.float().abs().max().item() if want.numel() else 0.0, 1.0)
    assert error <= TOLERANCE[dtype] * scale, f"max error {error:.3g} at scale {scale:.3g} ({dtype})"


def _check_against_reference(kernels, pool: LoraPool, token_adapter: torch.Tensor, x: torch.Tensor,
                             out: torch.Tensor) -> None:
    """`kernels`' shrink, then its expand of that, equal the reference's; untouched rows stay bit-exact."""
    args = (pool.offsets, pool.ranks, token_adapter)
    want_shrunk = reference.lora_shrink(x, pool.a_pool, *args, pool.max_rank)
    got_shrunk = kernels.lora_shrink(x, pool.a_pool, *args, pool.max_rank)
    _assert_close(got_shrunk, want_shrunk, x.dtype)
    rank = pool.ranks.cpu()[token_adapter.cpu().clamp(min=0)] * (token_adapter.cpu() >= 0)  # [T] per token
    past_rank = torch.arange(pool.max_rank)[None, :] >= rank[:, None]
    assert torch.all(got_shrunk.cpu()[past_rank] == 0)

    want = reference.lora_expand(want_shrunk, pool.b_pool, *args, out.clone())
    got = kernels.lora_expand(got_shrunk, pool.b_pool, *args, out.clone())
    _assert_close(got, want, out.dtype)
    untouched = (rank == 0).to(out.device)
    assert torch.equal(got[untouched], out[untouched])


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("layout", ["decode", "prefill"])
@pytest.mark.parametrize("mix", MIXES)
@pytest.mark.parametrize("seed", [0, 1])
def test_kernels_equal_reference(seed, mix, layout, dtype):
    rng, gen = random.Random(f"{seed}-{mix}-{layout}"), torch.Generator().manual_seed(seed)
    in_features, out_features = rng.choice(SMALL_IN), rng.choice(SMALL_OUT)
    pool = _pool(in_features, out_features, dtype, gen, rng)
    token_adapter = _token_adapter(mix, layout, rng)
    x = torch.randn(token_adapter.numel(), in_features, generator=gen).to(dtype)
    out = torch.randn(token_adapter.numel(), out_features, generator=gen).to(dtype)
    _check_against_reference(sgmv, pool, token_adapter, x, out)


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_kernels_equal_reference_realistic_shape(dtype):
    """A SmolLM2-sized up projection (576 -> 1536), zipf prefill runs with base-only rows, into a strided
    `out` (a column slice of a wider output, as a fused projection would hand over)."""
    rng, gen = random.Random(7), torch.Generator().manual_seed(7)
    pool = _pool(576, 1536, dtype, gen, rng)
    token_adapter = torch.tensor([2] * 17 + [-1] * 3 + [0] * 6 + [5, 1, 1, EMPTY_SLOT])
    x = torch.randn(token_adapter.numel(), 576, generator=gen).to(dtype)
    wide = torch.randn(token_adapter.numel(), 40 + 1536 + 60, generator=gen).to(dtype)
    before = wide.clone()
    want = reference.apply_lora(x, wide[:, 40:-60].clone(), pool, token_adapter)
    got = sgmv.apply_lora(x, wide[:, 40:-60], pool, token_adapter)  # in place, through the view
    _assert_close(got, want, dtype)
    assert torch.equal(wide[:, 40:-60], got)
    assert torch.equal(wide[:, :40], before[:, :40]) and torch.equal(wide[:, -60:], before[:, -60:])
    untouched = (token_adapter == -1) | (token_adapter == EMPTY_SLOT)
    assert torch.equal(wide[untouched], before[untouched])


@pytest.mark.parametrize(("token_adapter", "tiles", "block_t"), [
    ([], [], 1),
    ([-1, -1], [], 1),
    ([3, 1, 3, -1, 0], [(0, 1, 3), (1, 1, 1), (2, 1, 3), (4, 1, 0)], 1),  # decode, all distinct: BGMV
    ([2, 2, 2, -1, 0], [(0, 3, 2), (4, 1, 0)], 16),
    ([1] * 20 + [0] * 5, [(0, 20, 1), (20, 5, 0)], 32),
    ([4] * 150, [(0, 64, 4), (64, 64, 4), (128, 22, 4)], 64),  # long runs split at SGMV_MAX_BLOCK_T
])
def test_segments(token_adapter, tiles, block_t):
    segments = sgmv.lora_segments(torch.tensor(token_adapter, dtype=torch.int64))
    got = list(zip(segments.tile_start.tolist(), segments.tile_len.tolist(), segments.tile_adapter.tolist()))
    assert got == tiles and segments.block_t == block_t and segments.num_tokens == len(token_adapter)
    assert segments.max_adapter == max(token_adapter, default=-1)


@needs_interpreter
def test_precomputed_segments_and_empty_cases():
    rng, gen = random.Random(3), torch.Generator().manual_seed(3)
    pool = _pool(100, 70, torch.float32, gen, rng)
    token_adapter = torch.tensor([1, 1, -1, 4, 4, 4])
    x, out = torch.randn(6, 100, generator=gen), torch.randn(6, 70, generator=gen)
    segments = sgmv.lora_segments(token_adapter)
    want = reference.apply_lora(x, out.clone(), pool, token_adapter)
    _assert_close(sgmv.apply_lora(x, out.clone(), pool, token_adapter, segments=segments), want, torch.float32)
    with pytest.raises(ValueError, match="built for 6 tokens"):
        sgmv.apply_lora(x[:5], out[:5].clone(), pool, token_adapter[:5], segments=segments)

    one = reference.apply_lora(x[:1], out[:1].clone(), pool, token_adapter[:1])  # T = 1
    _assert_close(sgmv.apply_lora(x[:1], out[:1].clone(), pool, token_adapter[:1]), one, torch.float32)

    base_only = torch.full((6,), -1)
    assert torch.equal(sgmv.apply_lora(x, out.clone(), pool, base_only), out)
    empty = LoraPool(NUM_SLOTS, 100, 70, "cpu", torch.float32)
    assert torch.equal(sgmv.apply_lora(x, out.clone(), empty, token_adapter), out)
    assert sgmv.lora_shrink(x[:0], pool.a_pool, pool.offsets, pool.ranks, token_adapter[:0], 8).shape == (0, 8)


@pytest.mark.parametrize("impl", ["kernels", "reference"])
def test_bad_kernel_arguments_raise_value_error(impl):
    kernels = sgmv if impl == "kernels" else reference
    rng, gen = random.Random(4), torch.Generator().manual_seed(4)
    pool = _pool(100, 70, torch.float32, gen, rng)
    x, out, ok = torch.randn(3, 100, generator=gen), torch.randn(3, 70, generator=gen), torch.tensor([0, 1, -1])
    shrunk = torch.zeros(3, pool.max_rank)
    with pytest.raises(ValueError, match="x \\[T, in\\] and a_pool"):
        kernels.lora_shrink(x[:, :99], pool.a_pool, pool.offsets, pool.ranks, ok, pool.max_rank)
    with pytest.raises(ValueError, match="share one of"):
        kernels.lora_shrink(x.bfloat16(), pool.a_pool, pool.offsets, pool.ranks, ok, pool.max_rank)
    with pytest.raises(ValueError, match="token_adapter must be an integer tensor of shape \\[3\\]"):
        kernels.lora_shrink(x, pool.a_pool, pool.offsets, pool.ranks, ok[:2], pool.max_rank)
    with pytest.raises(ValueError, match="int32"):
        kernels.lora_shrink(x, pool.a_pool, pool.offsets.long(), pool.ranks, ok, pool.max_rank)
    with pytest.raises(ValueError, match="slot|outside"):
        kernels.lora_shrink(x, pool.a_pool, pool.offsets, pool.ranks, torch.tensor([0, NUM_SLOTS, -1]), pool.max_rank)
    with pytest.raises(ValueError, match="out must be \\[3, 70\\]"):
        kernels.lora_expand(shrunk, pool.b_pool, pool.offsets, pool.ranks, ok, out[:, :69])


def test_pool_packs_mixed_ranks_without_padding():
    gen = torch.Generator().manual_seed(5)
    pool = LoraPool(5, 24, 40, "cpu", torch.float32)
    ranks = {3: 5, 0: 64, 4: 8, 1: 13}
    weights = {slot: _weights(rank, 24, 40, gen) for slot, rank in ranks.items()}
    for slot, w in weights.items():
        pool.add(slot, w)
    assert pool.used_rows == sum(ranks.values()) == pool.a_pool.shape[0] == pool.b_pool.shape[0]
    assert pool.max_rank == 64
    assert pool.ranks.tolist() == [64, 13, 0, 5, 8] and pool.offsets.tolist() == [5, 77, 0, 0, 69]
    for slot, w in weights.items():
        lo, hi = pool.offset_of(slot), pool.offset_of(slot) + ranks[slot]
        assert torch.equal(pool.a_pool[lo:hi], w.a)
        assert torch.equal(pool.b_pool[lo:hi], w.b.T * w.scaling)


def test_pool_add_remove_readd_keeps_others_exact():
    """A seeded sequence of adds and removes: after each, every resident adapter's rows are exactly its
    own, the pool is exactly sum(ranks) rows, and the index tensors agree with the host view."""
    rng, gen = random.Random(6), torch.Generator().manual_seed(6)
    pool = LoraPool(6, 30, 20, "cpu", torch.bfloat16)
    resident: dict[int, LoraWeights] = {}
    for _ in range(40):
        slot = rng.randrange(6)
        version = pool.version
        if slot in resident:
            pool.remove(slot)
            del resident[slot]
        else:
            resident[slot] = _weights(rng.choice(RANKS), 30, 20, gen)
            pool.add(slot, resident[slot])
        assert pool.version == version + 1
        assert pool.used_rows == sum(w.rank for w in resident.values())
        assert pool.ranks.tolist() == [resident[s].rank if s in resident else 0 for s in range(6)]
        for s, w in resident.items():
            lo = int(pool.offsets[s])
            assert pool.offset_of(s) == lo
            assert torch.equal(pool.a_pool[lo:lo + w.rank], w.a.bfloat16())
            assert torch.equal(pool.b_pool[lo:lo + w.rank], (w.b.T * w.scaling).bfloat16())


def test_pool_and_reference_equal_the_lora_formula():
    """Independent of the pool layout: each token gets scaling * (x @ A.T) @ B.T of its own adapter (the
    kernels are checked against this reference everywhere else)."""
    gen = torch.Generator().manual_seed(8)
    pool = LoraPool(3, 24, 16, "cpu", torch.float32)
    weights = {0: _weights(5, 24, 16, gen), 2: _weights(9, 24, 16, gen)}
    for slot, w in weights.items():
        pool.add(slot, w)
    token_adapter = [2, 0, -1, 1, 2]
    x, out = torch.randn(5, 24, generator=gen), torch.randn(5, 16, generator=gen)
    want = out.clone()
    for t, slot in enumerate(token_adapter):
        if slot in weights:
            w = weights[slot]
            want[t] += w.scaling * (x[t] @ w.a.T) @ w.b.T
    _assert_close(reference.apply_lora(x, out.clone(), pool, torch.tensor(token_adapter)), want, torch.float32)


def test_pool_bad_inputs_raise_value_error():
    gen = torch.Generator().manual_seed(9)
    pool = LoraPool(2, 24, 16, "cpu", torch.float32)
    with pytest.raises(ValueError, match="rank must be at least 1"):
        pool.add(0, LoraWeights(a=torch.zeros(0, 24), b=torch.zeros(16, 0), scaling=1.0))
    with pytest.raises(ValueError, match="do not fit this module"):
        pool.add(0, _weights(4, 25, 16, gen))
    with pytest.raises(ValueError, match="do not fit this module"):
        pool.add(0, LoraWeights(a=torch.zeros(4, 24), b=torch.zeros(16, 5), scaling=1.0))
    with pytest.raises(ValueError, match="unknown LoRA pool slot 2"):
        pool.add(2, _weights(4, 24, 16, gen))
    with pytest.raises(ValueError, match="holds no adapter"):
        pool.remove(1)
    pool.add(0, _weights(4, 24, 16, gen))
    with pytest.raises(ValueError, match="already holds an adapter"):
        pool.add(0, _weights(4, 24, 16, gen))
    with pytest.raises(ValueError, match="dtype must be one of"):
        LoraPool(2, 24, 16, "cpu", torch.float64)
    assert pool.used_rows == 4 and pool.version == 1  # the failed calls changed nothing


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.skipif(INTERPRETED, reason="TRITON_INTERPRET=1 for the whole run: the kernels are not compiled")
def test_compiled_kernels_on_cuda_equal_reference(dtype):
    rng, gen = random.Random(10), torch.Generator().manual_seed(10)
    for in_features, out_features in [(4096, 4096), (576, 1536), (100, 70)]:
        pool = _pool(in_features, out_features, dtype, gen, rng, device="cuda")
        for mix in MIXES:
            for layout in ("decode", "prefill"):
                token_adapter = _token_adapter(mix, layout, rng).cuda()
                x = torch.randn(token_adapter.numel(), in_features, generator=gen).to("cuda", dtype)
                out = torch.randn(token_adapter.numel(), out_features, generator=gen).to("cuda", dtype)
                _check_against_reference(sgmv, pool, token_adapter, x, out)
        long_prefill = torch.tensor([1] * 300 + [3] * 200 + [-1] * 20, device="cuda")  # several tiles per run
        x = torch.randn(long_prefill.numel(), in_features, generator=gen).to("cuda", dtype)
        out = torch.randn(long_prefill.numel(), out_features, generator=gen).to("cuda", dtype)
        _check_against_reference(sgmv, pool, long_prefill, x, out)
