"""One target module's LoRA weights for many adapters of mixed ranks, packed without padding.

Layout, per target module (s a slot, r_s its rank in this module):

    a_pool:  [sum(r_s), in]    rows offsets[s] .. offsets[s] + r_s - 1  =  A_s                 (A_s: [r_s, in])
    b_pool:  [sum(r_s), out]   the same rows                            =  scaling_s * B_s.T   (B_s: [out, r_s])
    offsets: [num_slots] int32 first pool row of slot s (0 where the slot is empty)
    ranks:   [num_slots] int32 r_s (0: empty slot, or its adapter does not target this module)

Both pools keep an adapter as a block of contiguous ROWS, so a kernel reads A_s as [r_s, BLOCK_K] tiles
and scaling_s * B_s.T as [r_s, BLOCK_N] tiles, both unit-stride along the long axis; the scaling is
folded into B once at load time instead of once per token.

Why no padding: lora_slots.py pads every slot to the largest resident rank, so one rank-64 adapter among
rank-8 ones makes every slot 8x larger and multiplies the masked matmul's work by 8. Here a slot takes
exactly r_s rows, and a kernel loops only over the rank of the adapter it is serving.

Why compaction rather than a free list: `remove` moves the rows after the removed block down by one
copy, `add` appends, so the pool is always exactly sum(r_s) rows: no fragmentation and no allocator to
get wrong. Adapters are added and removed when they are loaded or evicted, rare next to forward steps,
so the O(pool) copy costs little next to reading the adapter from disk. The price: every change replaces
the four tensors, so read them from the pool for each step rather than keeping references across an
add or remove (`version` changes with every change, for callers that cache anything derived from them).

Slots are numbers the caller chooses in [0, num_slots): one slot number names an adapter in every
module's pool, so a single token -> slot map (`token_adapter`) serves all modules of a forward step, and
an adapter that skips a module simply has rank 0 there.

`check_shrink_args` / `check_expand_args` are the layout's contract for kernels and the reference alike;
they read shapes, dtypes and devices only, never tensor values, so they cost no device sync.
"""

from __future__ import annotations

import math

import torch

from adapters import LoraWeights

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
INDEX_DTYPE = torch.int32  # offsets and ranks: what the kernels load


class LoraPool:
    """Rank-packed A and scaled-B row pools of one target module, for up to `num_slots` adapters."""

    def __init__(self, num_slots: int, in_features: int, out_features: int, device: torch.device | str,
                 dtype: torch.dtype) -> None:
        if num_slots < 1 or in_features < 1 or out_features < 1:
            raise ValueError(f"LoraPool needs positive sizes, got num_slots={num_slots}, "
                             f"in_features={in_features}, out_features={out_features}")
        if dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"LoraPool dtype must be one of {SUPPORTED_DTYPES}, got {dtype}")
        self.num_slots, self.in_features, self.out_features = num_slots, in_features, out_features
        self.device, self.dtype = torch.device(device), dtype
        self._offsets = [0] * num_slots  # host copies: the truth, read without a device sync
        self._ranks = [0] * num_slots
        self.a_pool = torch.zeros(0, in_features, device=self.device, dtype=dtype)  # [sum(r_s), in]
        self.b_pool = torch.zeros(0, out_features, device=self.device, dtype=dtype)  # [sum(r_s), out]
        self.offsets = torch.zeros(num_slots, device=self.device, dtype=INDEX_DTYPE)  # [num_slots]
        self.ranks = torch.zeros(num_slots, device=self.device, dtype=INDEX_DTYPE)  # [num_slots]
        self.version = 0

    @property
    def max_rank(self) -> int:
        """The largest rank held (0 when empty): the width of `lora_shrink`'s output for this pool."""
        return max(self._ranks)

    @property
    def used_rows(self) -> int:
        return self.a_pool.shape[0]

    def rank_of(self, slot: int) -> int:
        """This module's rank for the adapter in `slot` (0: empty, or the adapter skips the module)."""
        self._check_slot(slot)
        return self._ranks[slot]

    def offset_of(self, slot: int) -> int:
        self._check_slot(slot)
        return self._offsets[slot]

    def add(self, slot: int, weights: LoraWeights) -> None:
        """Put an adapter's weights for this module into an empty `slot` (appended after every other)."""
        self._check_slot(slot)
        if self._ranks[slot]:
            raise ValueError(f"LoRA pool slot {slot} already holds an adapter; remove it first")
        a, b, scaling = weights.a, weights.b, weights.scaling
        if a.ndim != 2 or b.ndim != 2:
            raise ValueError(f"LoRA A and B must be 2-D, got A {tuple(a.shape)} and B {tuple(b.shape)}")
        rank = a.shape[0]
        if rank < 1:
            raise ValueError("LoRA rank must be at least 1, got an A with 0 rows")
        if a.shape[1] != self.in_features or b.shape != (self.out_features, rank):
            raise ValueError(f"LoRA shapes A {tuple(a.shape)}, B {tuple(b.shape)} do not fit this module: "
                             f"expected A [rank, {self.in_features}] and B [{self.out_features}, rank]")
        if not math.isfinite(scaling):
            raise ValueError(f"LoRA scaling must be finite, got {scaling}")
        a_rows = a.detach().to(device=self.device, dtype=self.dtype)
        b_rows = (b.detach().to(device=self.device, dtype=torch.float32).T * scaling).to(self.dtype)
        self._offsets[slot], self._ranks[slot] = self.used_rows, rank
        self.a_pool = torch.cat([self.a_pool, a_rows])
        self.b_pool = torch.cat([self.b_pool, b_rows])
        self._publish()

    def remove(self, slot: int) -> None:
        """Empty `slot`, moving the rows of every adapter stored after it down over its block."""
        self._check_slot(slot)
        rank, offset = self._ranks[slot], self._offsets[slot]
        if not rank:
            raise ValueError(f"LoRA pool slot {slot} holds no adapter")
        end = offset + rank
        self.a_pool = torch.cat([self.a_pool[:offset], self.a_pool[end:]])
        self.b_pool = torch.cat([self.b_pool[:offset], self.b_pool[end:]])
        for other in range(self.num_slots):
            if self._ranks[other] and self._offsets[other] >= end:
                self._offsets[other] -= rank
        self._offsets[slot], self._ranks[slot] = 0, 0
        self._publish()

    def _publish(self) -> None:
        """Upload the host offsets and ranks (one small copy per change) and mark the change."""
        self.offsets = torch.tensor(self._offsets, device=self.device, dtype=INDEX_DTYPE)
        self.ranks = torch.tensor(self._ranks, device=self.device, dtype=INDEX_DTYPE)
        self.version += 1

    def _check_slot(self, slot: int) -> None:
        if not 0 <= slot < self.num_slots:
            raise ValueError(f"unknown LoRA pool slot {slot}: slots are 0..{self.num_slots - 1}")


def _same_device(*tensors: torch.Tensor) -> None:
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        raise ValueError(f"LoRA kernel arguments must share one device, got {sorted(map(str, devices))}")


def _check_index(offsets: torch.Tensor, ranks: torch.Tensor, token_adapter: torch.Tensor, tokens: int) -> None:
    if offsets.ndim != 1 or offsets.shape != ranks.shape:
        raise ValueError(f"offsets and ranks must be 1-D of one length, got {tuple(offsets.shape)} "
                         f"and {tuple(ranks.shape)}")
    if offsets.dtype != INDEX_DTYPE or ranks.dtype != INDEX_DTYPE:
        raise ValueError(f"offsets and ranks must be {INDEX_DTYPE}, got {offsets.dtype} and {ranks.dtype}")
    if token_adapter.shape != (tokens,) or token_adapter.dtype.is_floating_point or token_adapter.dtype == torch.bool:
        raise ValueError(f"token_adapter must be an integer tensor of shape [{tokens}], "
                         f"got {token_adapter.dtype} {tuple(token_adapter.shape)}")


def check_shrink_args(x: torch.Tensor, a_pool: torch.Tensor, offsets: torch.Tensor, ranks: torch.Tensor,
                      token_adapter: torch.Tensor, max_rank: int) -> None:
    """Raise ValueError unless x [T, in] and a_pool [rows, in] share a supported dtype and device and
    the index tensors fit T tokens."""
    if x.ndim != 2 or a_pool.ndim != 2 or x.shape[1] != a_pool.shape[1]:
        raise ValueError(f"lora_shrink needs x [T, in] and a_pool [rows, in], got {tuple(x.shape)} "
                         f"and {tuple(a_pool.shape)}")
    if x.dtype not in SUPPORTED_DTYPES or x.dtype != a_pool.dtype:
        raise ValueError(f"x and a_pool must share one of {SUPPORTED_DTYPES}, got {x.dtype} and {a_pool.dtype}")
    if max_rank < 0:
        raise ValueError(f"max_rank must be >= 0, got {max_rank}")
    _check_index(offsets, ranks, token_adapter, x.shape[0])
    _same_device(x, a_pool, offsets, ranks, token_adapter)


def check_expand_args(shrunk: torch.Tensor, b_pool: torch.Tensor, offsets: torch.Tensor, ranks: torch.Tensor,
                      token_adapter: torch.Tensor, out: torch.Tensor) -> None:
    """Raise ValueError unless shrunk [T, max_rank], b_pool [rows, out] and out [T, out] fit together."""
    if shrunk.ndim != 2 or b_pool.ndim != 2 or out.ndim != 2:
        raise ValueError(f"lora_expand needs shrunk [T, max_rank], b_pool [rows, out] and out [T, out], got "
                         f"{tuple(shrunk.shape)}, {tuple(b_pool.shape)} and {tuple(out.shape)}")
    if out.shape != (shrunk.shape[0], b_pool.shape[1]):
        raise ValueError(f"out must be [{shrunk.shape[0]}, {b_pool.shape[1]}] (tokens, b_pool width), "
                         f"got {tuple(out.shape)}")
    for name, tensor in (("shrunk", shrunk), ("b_pool", b_pool), ("out", out)):
        if tensor.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"{name} must be one of {SUPPORTED_DTYPES}, got {tensor.dtype}")
    _check_index(offsets, ranks, token_adapter, out.shape[0])
    _same_device(shrunk, b_pool, offsets, ranks, token_adapter, out)
