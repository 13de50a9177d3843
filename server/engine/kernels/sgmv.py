"""Triton segmented-gather LoRA kernels (Punica's SGMV, with BGMV as its one-token case).

    shrunk = lora_shrink(x, a_pool, offsets, ranks, token_adapter, max_rank)    # [T, max_rank] float32
    lora_expand(shrunk, b_pool, offsets, ranks, token_adapter, out)              # out += delta, in place

Per token t with adapter s = token_adapter[t] (r = ranks[s], o = offsets[s]; layout in lora_pool.py):

    shrunk[t, :r] = x[t] @ a_pool[o : o + r].T          shrunk[t, r:] = 0
    out[t]       += shrunk[t, :r] @ b_pool[o : o + r]    (b_pool rows already hold scaling * B.T)

and a token with s = -1, or with r = 0 (its adapter skips this module), reads nothing and has its `out`
row left bit-for-bit as it was. reference.py is the same math as a loop; the tests compare the two.

Why tiles of consecutive same-adapter tokens (SGMV) rather than one grid cell per token block: a block
of tokens on different adapters would need a separate gather of A for every token, so it could not use
a matrix-multiply unit; a run of tokens sharing an adapter can (one [BLOCK_T, BLOCK_K] x [BLOCK_K,
BLOCK_R] dot per step, A read once per tile). `lora_segments` cuts token_adapter into its runs, drops
the -1 runs and splits long runs into tiles of at most `block_t` tokens; the kernels' first grid axis
is those tiles. A prefill step (each request's prompt one run) gets few long tiles; a decode step whose
rows all use different adapters has only runs of one token, and then gets block_t = 1, a matrix-vector
product per token (BGMV) instead of a 16-row dot with 15 dead rows. One kernel pair covers both, so
there is one code path to test.

Accumulation is float32 whatever the inputs: x and the pools may be float32, bfloat16 or float16
(x and a_pool one dtype), `out` any of the three. Half-precision expands round shrunk to the pool's dtype
before the dot (the tensor cores' input); float32 dots are IEEE (no TF32), so float32 matches the
reference to about 1e-5.

Wiring contract (lora_layer.py, CUDA backend):

- Import this module only when this backend is chosen: triton is an optional dependency (the `dev`
  extra; CUDA builds of torch bring their own).
- One `LoraPool` per target module, all on the model's device and dtype. An adapter gets ONE slot
  number, used in every module's pool (`pool.add(slot, weights)` for each module it targets; modules it
  skips keep rank 0 for that slot). Evicting it is `pool.remove(slot)` in each of those pools. Slot
  numbers are the caller's to manage (LoraSlots' LRU can hand them out).
- A combination (weighted sum of adapters) fits as one slot of its own: A = cat(A_i) and B = cat(w_i *
  scaling_i * B_i, dim=1) with scaling 1.0, rank sum(r_i); no kernel change.
- Once per forward step: `token_adapter` [T] integer, one entry per flattened token in x's row order
  (-1: base only). Build it on the host from the batch's rows, then ONCE `segments =
  lora_segments(host_token_adapter, device)` (no device sync: the tiles are built on the host and
  uploaded) and `token_adapter = host_token_adapter.to(device)`; pass both to every module's call.
  Without `segments` each call rebuilds them from token_adapter, a device-to-host sync per module.
  Prefill batches should keep each request's tokens consecutive (they are in x anyway): one run each.
- In each LoRA linear, after the base matmul: `apply_lora(x.view(-1, in), out.view(-1, out), pool,
  token_adapter, segments=segments)`. `out` must be a view of the layer's output (it is written in
  place); strided views (a slice of a fused qkv output) are fine.
- Read `pool.a_pool` etc. at call time: an add or remove replaces those tensors. The grid size depends
  on the batch's tiles, so these calls are not CUDA-graph-capturable as they stand.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from server.engine.kernels.lora_pool import INDEX_DTYPE, LoraPool, check_expand_args, check_shrink_args

NO_ADAPTER = -1
BGMV_BLOCK_T = 1  # tokens per tile when every run is one token long (decode rows on distinct adapters)
SGMV_MIN_BLOCK_T = 16  # tl.dot's smallest M
SGMV_MAX_BLOCK_T = 64  # longer runs are split: more tiles in flight, bounded registers per program
SHRINK_BLOCK_K = 64  # input features per step of the shrink's reduction
SHRINK_BLOCK_R = 16  # rank columns per shrink program (the second grid axis splits large ranks)
EXPAND_BLOCK_R = 16  # rank rows per step of the expand's reduction (tl.dot's smallest K)
EXPAND_BLOCK_N = 64  # output features per expand program


@dataclass(frozen=True)
class LoraSegments:
    """A step's token -> adapter map as kernel tiles: runs of consecutive tokens on one adapter, -1 runs
    dropped, long runs split into at most `block_t` tokens. Built once per forward step, shared by every
    module (it depends on token_adapter only, not on any pool)."""

    tile_start: torch.Tensor  # [n_tiles] int32: first token of the tile
    tile_len: torch.Tensor  # [n_tiles] int32: its tokens, 1..block_t
    tile_adapter: torch.Tensor  # [n_tiles] int32: its slot, never -1
    block_t: int  # BGMV_BLOCK_T, or a power of two in [SGMV_MIN_BLOCK_T, SGMV_MAX_BLOCK_T]
    num_tokens: int  # T of the token_adapter it was built from
    max_adapter: int  # the largest slot named (-1: none), checked against each pool without a sync

    @property
    def num_tiles(self) -> int:
        return self.tile_start.shape[0]


def _block_t(longest_run: int) -> int:
    """BGMV when every run is one token (decode rows on distinct adapters: a 16-row dot would be 15 dead
    rows); otherwise the longest run's next power of two within the dot's limits, so a short run wastes
    few rows and a long one is cut into several tiles that run in parallel."""
    if longest_run <= 1:
        return BGMV_BLOCK_T
    return min(SGMV_MAX_BLOCK_T, max(SGMV_MIN_BLOCK_T, triton.next_power_of_2(longest_run)))


def lora_segments(token_adapter: torch.Tensor, device: torch.device | str | None = None) -> LoraSegments:
    """Tiles of `token_adapter` [T] (slots, -1 = base only), on `device` (default: token_adapter's).
    token_adapter is read on the host: pass a CPU tensor built from the batch's rows and the target
    device, and the only transfer is one upload of the tiles."""
    if token_adapter.ndim != 1 or token_adapter.dtype.is_floating_point or token_adapter.dtype == torch.bool:
        raise ValueError(f"token_adapter must be a 1-D integer tensor, got {token_adapter.dtype} "
                         f"{tuple(token_adapter.shape)}")
    host = token_adapter.detach().to("cpu", torch.int64)
    if host.numel() and int(host.min()) < NO_ADAPTER:
        raise ValueError(f"token_adapter holds {int(host.min())}; slots are >= 0 and -1 means no adapter")
    adapters, lengths = torch.unique_consecutive(host, return_counts=True)
    starts = torch.cumsum(lengths, 0) - lengths
    keep = adapters != NO_ADAPTER
    adapters, lengths, starts = adapters[keep], lengths[keep], starts[keep]
    block_t = _block_t(int(lengths.max()) if lengths.numel() else 0)
    tiles_per_run = (lengths + block_t - 1) // block_t
    run = torch.repeat_interleave(torch.arange(adapters.numel()), tiles_per_run)  # [n_tiles]: its run
    first_tile = torch.cumsum(tiles_per_run, 0) - tiles_per_run
    skip = (torch.arange(run.numel()) - first_tile[run]) * block_t  # tokens of the run before the tile
    tiles = torch.stack([starts[run] + skip, torch.clamp(lengths[run] - skip, max=block_t), adapters[run]])
    tiles = tiles.to(token_adapter.device if device is None else device, INDEX_DTYPE)  # [3, n_tiles], one upload
    return LoraSegments(
        tile_start=tiles[0], tile_len=tiles[1], tile_adapter=tiles[2], block_t=block_t, num_tokens=host.numel(),
        max_adapter=int(adapters.max()) if adapters.numel() else NO_ADAPTER,
    )


@triton.jit
def _shrink_kernel(x_ptr, a_ptr, y_ptr, offsets_ptr, ranks_ptr, tile_start_ptr, tile_len_ptr, tile_adapter_ptr,
                   in_features, max_rank, stride_xt, stride_xk, stride_ar, stride_ak, stride_yt,
                   BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, USE_DOT: tl.constexpr,
                   DOT_IN_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Grid (tile, rank block): y[tile's tokens, rank block] = x[tokens] @ A_s[rank block].T.

    USE_DOT (BLOCK_T >= 16): one [BLOCK_T, BLOCK_K] x [BLOCK_K, BLOCK_R] dot per step. Otherwise
    (BLOCK_T = 1, BGMV) products pile up elementwise in [BLOCK_K, BLOCK_R] and are reduced once at the end."""
    tile = tl.program_id(0)
    r0 = tl.program_id(1) * BLOCK_R
    start = tl.load(tile_start_ptr + tile)
    count = tl.load(tile_len_ptr + tile)
    adapter = tl.load(tile_adapter_ptr + tile)
    rank = tl.load(ranks_ptr + adapter)
    offset = tl.load(offsets_ptr + adapter)
    t = tl.arange(0, BLOCK_T)
    r = r0 + tl.arange(0, BLOCK_R)
    k = tl.arange(0, BLOCK_K)
    tokens = (start + t).to(tl.int64)
    t_mask = t < count
    r_mask = r < rank
    x_ptrs = x_ptr + tokens[:, None] * stride_xt + k[None, :] * stride_xk  # [BLOCK_T, BLOCK_K]
    a_ptrs = a_ptr + (offset + r).to(tl.int64)[None, :] * stride_ar + k[:, None] * stride_ak  # A_s.T tile
    if USE_DOT:
        acc = tl.zeros((BLOCK_T, BLOCK_R), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_K, BLOCK_R), dtype=tl.float32)
    k_end = tl.where(r0 < rank, in_features, 0)  # a rank block past this adapter's rank reads nothing
    for k0 in range(0, k_end, BLOCK_K):
        k_mask = k0 + k < in_features
        x = tl.load(x_ptrs, mask=t_mask[:, None] & k_mask[None, :], other=0.0)
        a = tl.load(a_ptrs, mask=r_mask[None, :] & k_mask[:, None], other=0.0)
        if USE_DOT:
            if DOT_IN_FP32:
                x, a = x.to(tl.float32), a.to(tl.float32)
            acc = tl.dot(x, a, acc, input_precision=DOT_PRECISION)
        else:
            acc += tl.trans(x).to(tl.float32) * a.to(tl.float32)
        x_ptrs += BLOCK_K * stride_xk
        a_ptrs += BLOCK_K * stride_ak
    if USE_DOT:
        result = acc
    else:
        result = tl.sum(acc, axis=0)[None, :]
    tl.store(y_ptr + tokens[:, None] * stride_yt + r[None, :], result, mask=t_mask[:, None] & (r < max_rank)[None, :])


@triton.jit
def _expand_kernel(y_ptr, b_ptr, out_ptr, offsets_ptr, ranks_ptr, tile_start_ptr, tile_len_ptr, tile_adapter_ptr,
                   out_features, stride_yt, stride_yr, stride_br, stride_bn, stride_ot, stride_on,
                   BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, USE_DOT: tl.constexpr,
                   DOT_IN_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Grid (tile, output block): out[tile's tokens, block] += y[tokens, :r] @ b_pool rows of s.
    USE_DOT as in the shrink; the BGMV form piles products up in [BLOCK_R, BLOCK_N]."""
    tile = tl.program_id(0)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    start = tl.load(tile_start_ptr + tile)
    count = tl.load(tile_len_ptr + tile)
    adapter = tl.load(tile_adapter_ptr + tile)
    rank = tl.load(ranks_ptr + adapter)
    offset = tl.load(offsets_ptr + adapter)
    t = tl.arange(0, BLOCK_T)
    r = tl.arange(0, BLOCK_R)
    tokens = (start + t).to(tl.int64)
    t_mask = t < count
    n_mask = n < out_features
    y_ptrs = y_ptr + tokens[:, None] * stride_yt + r[None, :] * stride_yr  # [BLOCK_T, BLOCK_R]
    b_ptrs = b_ptr + (offset + r).to(tl.int64)[:, None] * stride_br + n[None, :] * stride_bn  # [BLOCK_R, BLOCK_N]
    if USE_DOT:
        acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, rank, BLOCK_R):
        r_mask = r0 + r < rank
        b = tl.load(b_ptrs, mask=r_mask[:, None] & n_mask[None, :], other=0.0)
        y = tl.load(y_ptrs, mask=t_mask[:, None] & r_mask[None, :], other=0.0)
        if USE_DOT:
            y = y.to(b.dtype)  # the matrix units take one input dtype: the pool's
            if DOT_IN_FP32:
                y, b = y.to(tl.float32), b.to(tl.float32)
            acc = tl.dot(y, b, acc, input_precision=DOT_PRECISION)
        else:
            acc += tl.trans(y).to(tl.float32) * b.to(tl.float32)
        y_ptrs += BLOCK_R * stride_yr
        b_ptrs += BLOCK_R * stride_br
    if USE_DOT:
        delta = acc
    else:
        delta = tl.sum(acc, axis=0)[None, :]
    written = t < tl.where(rank > 0, count, 0)  # rank 0: leave out untouched, -0.0 included
    mask = written[:, None] & n_mask[None, :]
    out_ptrs = out_ptr + tokens[:, None] * stride_ot + n[None, :] * stride_on
    current = tl.load(out_ptrs, mask=mask, other=0.0)
    tl.store(out_ptrs, (current.to(tl.float32) + delta).to(current.dtype), mask=mask)


# Triton's interpreter multiplies bfloat16 tl.dot operands as raw bits (triton-lang/triton#11584, not
# supported upstream). Under it, and only there, bfloat16 tiles go to the dot as float32: the same
# products (a bfloat16 product is exact in float32, and the matrix units accumulate in float32 too).
_INTERPRETED = isinstance(_shrink_kernel, InterpretedFunction)


def _dot_in_fp32(dtype: torch.dtype) -> bool:
    return _INTERPRETED and dtype == torch.bfloat16


def _dot_precision(dtype: torch.dtype) -> str:
    """IEEE for float32 pools (Triton's default would round float32 operands to TF32, ~1e-3); half
    pools keep the default, which their tensor-core dots ignore anyway."""
    return "ieee" if dtype == torch.float32 else "tf32"


def _segments_for(token_adapter: torch.Tensor, slots: int, device: torch.device,
                  segments: LoraSegments | None) -> LoraSegments:
    segments = lora_segments(token_adapter) if segments is None else segments
    if segments.num_tokens != token_adapter.shape[0]:
        raise ValueError(f"segments were built for {segments.num_tokens} tokens, this call has "
                         f"{token_adapter.shape[0]}")
    if segments.max_adapter >= slots:
        raise ValueError(f"token_adapter names slot {segments.max_adapter}, but the pool has {slots} slots")
    if segments.tile_start.device != device:
        raise ValueError(f"segments are on {segments.tile_start.device}, the tensors on {device}")
    return segments


def lora_shrink(x: torch.Tensor, a_pool: torch.Tensor, offsets: torch.Tensor, ranks: torch.Tensor,
                token_adapter: torch.Tensor, max_rank: int, *, segments: LoraSegments | None = None) -> torch.Tensor:
    """x [T, in] -> float32 [T, max_rank]: row t = x_t @ A_{adapter(t)}.T, zeros past its rank and on
    -1 rows. Every rank in `ranks` named by token_adapter must be <= max_rank (LoraPool.max_rank is)."""
    check_shrink_args(x, a_pool, offsets, ranks, token_adapter, max_rank)
    segments = _segments_for(token_adapter, offsets.shape[0], x.device, segments)
    shrunk = torch.zeros(x.shape[0], max_rank, device=x.device, dtype=torch.float32)
    if segments.num_tiles == 0 or max_rank == 0:
        return shrunk
    grid = (segments.num_tiles, triton.cdiv(max_rank, SHRINK_BLOCK_R))
    _shrink_kernel[grid](
        x, a_pool, shrunk, offsets, ranks, segments.tile_start, segments.tile_len, segments.tile_adapter,
        x.shape[1], max_rank, x.stride(0), x.stride(1), a_pool.stride(0), a_pool.stride(1), shrunk.stride(0),
        BLOCK_T=segments.block_t, BLOCK_R=SHRINK_BLOCK_R, BLOCK_K=SHRINK_BLOCK_K,
        USE_DOT=segments.block_t >= SGMV_MIN_BLOCK_T, DOT_IN_FP32=_dot_in_fp32(x.dtype),
        DOT_PRECISION=_dot_precision(x.dtype),
    )
    return shrunk


def lora_expand(shrunk: torch.Tensor, b_pool: torch.Tensor, offsets: torch.Tensor, ranks: torch.Tensor,
                token_adapter: torch.Tensor, out: torch.Tensor, *,
                segments: LoraSegments | None = None) -> torch.Tensor:
    """out [T, out_features] += shrunk_t[:rank] @ b_pool rows of adapter(t), in place; returns out.
    shrunk [T, max_rank] is lora_shrink's output; -1 rows and rank-0 rows of out are not touched."""
    check_expand_args(shrunk, b_pool, offsets, ranks, token_adapter, out)
    segments = _segments_for(token_adapter, offsets.shape[0], out.device, segments)
    if segments.num_tiles == 0 or shrunk.shape[1] == 0:
        return out
    grid = (segments.num_tiles, triton.cdiv(out.shape[1], EXPAND_BLOCK_N))
    _expand_kernel[grid](
        shrunk, b_pool, out, offsets, ranks, segments.tile_start, segments.tile_len, segments.tile_adapter,
        out.shape[1], shrunk.stride(0), shrunk.stride(1), b_pool.stride(0), b_pool.stride(1),
        out.stride(0), out.stride(1),
        BLOCK_T=segments.block_t, BLOCK_R=EXPAND_BLOCK_R, BLOCK_N=EXPAND_BLOCK_N,
        USE_DOT=segments.block_t >= SGMV_MIN_BLOCK_T, DOT_IN_FP32=_dot_in_fp32(b_pool.dtype),
        DOT_PRECISION=_dot_precision(b_pool.dtype),
    )
    return out


def apply_lora(x: torch.Tensor, out: torch.Tensor, pool: LoraPool, token_adapter: torch.Tensor, *,
               segments: LoraSegments | None = None) -> torch.Tensor:
    """out [T, out] += each token's LoRA delta from `pool` for x [T, in]; returns out. Pass the step's
    `segments` (lora_segments(token_adapter)) to skip rebuilding them, and their host sync, per call."""
    if segments is None:
        segments = lora_segments(token_adapter)
    shrunk = lora_shrink(x, pool.a_pool, pool.offsets, pool.ranks, token_adapter, pool.max_rank, segments=segments)
    return lora_expand(shrunk, pool.b_pool, pool.offsets, pool.ranks, token_adapter, out, segments=segments)
