"""Device slots for adapters: per-module stacks that serve a whole mixed batch in two matmuls.

For each target module the resident adapters' weights are concatenated along the rank axis:

    a_cat: [n_slots * r_max, in]       row block s = A_s, zero-padded to r_max
    b_cat: [n_slots * r_max, out]      row block s = scaling_s * B_s.T, zero-padded

and a batch whose rows use slots `row_slot[b]` gets its LoRA delta as

    delta = ((x @ a_cat.T) * row_mask) @ b_cat,   row_mask[b] = 1 on block row_slot[b], 0 elsewhere

Both stacks keep slots as ROW blocks, so a batch reads a contiguous leading slice, or gathers the rows
of its own slots when it uses few of many resident adapters (a column slice of a row-major matrix would
send matmul down a slow strided path).

which equals, row by row, scaling * B(A(x)) of that row's adapter (the loop reference in lora_layer.py):
every other block is multiplied by exact zeros. Cost: two matmuls per module whatever the adapter mix,
no gathers. Slots are filled on demand and evicted least-recently-used among adapters neither in the
batch nor pinned. A pinned adapter that was removed or replaced is `retire`d by the registry: from then on
its slot is freed like any other (first, in fact) once no batch uses it; without that, every removal or
replacement of a pinned adapter would keep a slot forever, and after `num_slots` of them no new adapter
could be served.
"""

from __future__ import annotations

import collections
import contextlib
import threading
import weakref
from dataclasses import dataclass
from typing import Iterator

import torch

from server.engine.loaded import LoadedAdapter


@dataclass
class _ModuleStack:
    a_cat: torch.Tensor  # [n_slots * r_max, in]
    b_cat: torch.Tensor  # [n_slots * r_max, out]
    slots: set[int]  # slots whose adapter targets this module


class LoraSlots:
    def __init__(self, num_slots: int, shapes: dict[str, tuple[int, int]], device: torch.device,
                 dtype: torch.dtype) -> None:
        self.num_slots = num_slots
        self.shapes = shapes  # module name -> (out, in)
        self.device, self.dtype = device, dtype
        self.rank = 0
        self.stacks: dict[str, _ModuleStack] = {}
        self._slot_of: collections.OrderedDict[int, int] = collections.OrderedDict()  # id(adapter) -> slot, LRU
        self._adapter_in: list[LoadedAdapter | None] = [None] * num_slots
        self.loads = 0
        self.evictions = 0
        self.hits = 0
        self.generation = 0  # bumped whenever the stacks' contents or layout change
        self.slot_version = [0] * num_slots  # per slot: a new value whenever its contents change
        # removed or replaced adapters (any thread adds, the model thread reads); weak: an adapter that is
        # in no slot and held by no request goes away, and its entry with it
        self._retired: weakref.WeakSet[LoadedAdapter] = weakref.WeakSet()
        self._retired_lock = threading.Lock()
        self._copy_stream = None  # torch.cuda.Stream for slot loads, made on the first load on a GPU

    def retire(self, adapter: LoadedAdapter) -> None:
        """`adapter` is no longer what its name serves (removed, or replaced by a new version): its slot is
        reclaimable, pinned or not, once no batch uses it. Called from the admin thread."""
        with self._retired_lock:
            self._retired.add(adapter)

    @torch.inference_mode()  # stacks are inference tensors: always created and updated in this mode
    def slots_for(self, adapters: list[LoadedAdapter]) -> dict[int, int]:
        """Make every adapter resident (loading and evicting as needed) -> {id(adapter): slot}."""
        if len(adapters) > self.num_slots:
            raise ValueError(f"{len(adapters)} adapters in one batch, but only {self.num_slots} LoRA slots")
        wanted = {id(a) for a in adapters}
        result = {}
        for adapter in adapters:
            key = id(adapter)
            if key in self._slot_of:
                self._slot_of.move_to_end(key)
                self.hits += 1
            else:
                self._slot_of[key] = self._load(adapter, self._free_slot(wanted))
            result[key] = self._slot_of[key]
        return result

    def resident(self) -> int:
        return sum(a is not None for a in self._adapter_in)

    def _free_slot(self, keep: set[int]) -> int:
        for slot, adapter in enumerate(self._adapter_in):
            if adapter is None:
                return slot
        with self._retired_lock:
            retired = set(map(id, self._retired))
        evictable = [(key, slot) for key, slot in self._slot_of.items()  # least recently used first
                     if key not in keep and (key in retired or not self._adapter_in[slot].pinned)]
        if not evictable:
            raise RuntimeError("no LoRA slot can be freed: every slot holds a pinned adapter or one of this batch")
        key, slot = next(((k, s) for k, s in evictable if k in retired), evictable[0])  # retired ones go first
        del self._slot_of[key]
        self._clear(slot)
        self.evictions += 1
        return slot

    def _clear(self, slot: int) -> None:
        self.generation += 1
        self.slot_version[slot] = self.generation
        lo, hi = slot * self.rank, (slot + 1) * self.rank
        for stack in self.stacks.values():
            if slot in stack.slots:
                stack.a_cat[lo:hi] = 0
                stack.b_cat[lo:hi] = 0
                stack.slots.discard(slot)
        self._adapter_in[slot] = None

    def _load(self, adapter: LoadedAdapter, slot: int) -> int:
        self.generation += 1
        self.slot_version[slot] = self.generation
        if adapter.rank > self.rank:
            self._grow(adapter.rank)
        lo = slot * self.rank
        with self._copies():
            for module, weights in adapter.lora.items():
                stack = self._stack(module)
                r = weights.rank
                stack.a_cat[lo:lo + r].copy_(weights.a, non_blocking=True)
                b = stack.b_cat[lo:lo + r].copy_(weights.b.T, non_blocking=True)
                b.mul_(weights.scaling)
                stack.slots.add(slot)
        self._adapter_in[slot] = adapter
        self.loads += 1
        return slot

    @contextlib.contextmanager
    def _copies(self) -> Iterator[None]:
        """On a GPU: a slot load's copies from (pinned) host memory run on a side stream, and the compute
        stream waits for them only where its next kernels start, so the host never blocks on a load and
        queued decode work is not stalled behind it. Elsewhere: plain copies."""
        if self.device.type != "cuda":
            yield
            return
        if self._copy_stream is None:
            self._copy_stream = torch.cuda.Stream(self.device)
        self._copy_stream.wait_stream(torch.cuda.current_stream(self.device))  # stacks' earlier readers first
        with torch.cuda.stream(self._copy_stream):
            yield
        torch.cuda.current_stream(self.device).wait_stream(self._copy_stream)

    def _stack(self, module: str) -> _ModuleStack:
        stack = self.stacks.get(module)
        if stack is None:
            out_features, in_features = self.shapes[module]
            width = self.num_slots * self.rank
            stack = _ModuleStack(
                a_cat=torch.zeros(width, in_features, device=self.device, dtype=self.dtype),
                b_cat=torch.zeros(width, out_features, device=self.device, dtype=self.dtype),
                slots=set(),
            )
            self.stacks[module] = stack
        return stack

    def _grow(self, rank: int) -> None:
        """Re-lay every stack out with blocks of `rank` columns (keeps resident adapters)."""
        old_rank, self.rank = self.rank, rank
        for module, stack in list(self.stacks.items()):
            out_features, in_features = self.shapes[module]
            a_cat = torch.zeros(self.num_slots * rank, in_features, device=self.device, dtype=self.dtype)
            b_cat = torch.zeros(self.num_slots * rank, out_features, device=self.device, dtype=self.dtype)
            for slot in stack.slots:
                a_cat[slot * rank:slot * rank + old_rank] = stack.a_cat[slot * old_rank:(slot + 1) * old_rank]
                b_cat[slot * rank:slot * rank + old_rank] = stack.b_cat[slot * old_rank:(slot + 1) * old_rank]
            self.stacks[module] = _ModuleStack(a_cat, b_cat, stack.slots)
