"""Per-row LoRA weights for decode steps whose rows use (mostly) different adapters.

The masked stacked kernel (lora_layer.py) multiplies every row by every slot in the batch's block and
zeroes the other rows' blocks: with B rows on B distinct adapters that is B times the shrink and expand
arithmetic each row needs. Here each batch row instead gets its own adapter's blocks, copied out of the
slot stacks into per-module row buffers

    a_rows: [rows, in, r]     row i = A_{slot(i)}.T    (zeros where row i's adapter skips the module)
    b_rows: [rows, r, out]    row i = scaling * B_{slot(i)}.T

so the delta is two batched matmuls, `out += (x @ a_rows) @ b_rows`, with each row's own arithmetic
only (on this project's 2-core CPU, 8 rows on 8 rank-16 adapters over SmolLM2's q,k,v,o: 2.2 ms a
decode step instead of 5.1 ms). A row's blocks are copied when the row's (slot, slot version) changes,
so a steady batch copies nothing and a request joining or leaving copies only the rows that moved.

A combination row (loaded.Combination) holds its parents' blocks side by side, its weights folded into B:

    a_rows[i] = [A_p1.T, A_p2.T, ...]      b_rows[i] = [w_1 * scaling_1 * B_p1.T; w_2 * scaling_2 * B_p2.T; ...]

so its delta is sum_j w_j * delta_j in the same two matmuls. The buffers are then `parts * r` wide, `parts`
the most parents of any row in the batch (the other rows' extra blocks are zeros).

On CPU the row buffers are float32 whatever the model's dtype: CPU batched matmuls in bfloat16 ran 4.5x
slower than in float32 at these shapes, so a bfloat16 base gets its LoRA deltas computed in float32
(`apply` casts x up and the delta down).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from server.engine.lora_slots import LoraSlots

# Per row, for each of its adapters: (slot, the slot's load version, weight); None: no adapter on this row.
RowKey = tuple[tuple[int, int, float], ...] | None
RowParts = tuple[tuple[int, float], ...] | None  # per row: (slot, weight) of each adapter it sums
_MISSING = object()  # no views cached for a module yet (None is a cached answer: no row's adapter targets it)


@dataclass
class _RowBuffer:
    a: torch.Tensor  # [capacity, in, parts * r]
    b: torch.Tensor  # [capacity, parts * r, out]
    keys: list[RowKey] = field(default_factory=list)  # what each row holds now


class RowWeights:
    """Row buffers per module, kept in step with a LoraSlots and the current batch's rows."""

    def __init__(self, slots: LoraSlots) -> None:
        self.slots = slots
        self.dtype = torch.float32 if slots.device.type == "cpu" else slots.dtype
        self.row_keys: tuple[RowKey, ...] = ()
        self._buffers: dict[str, _RowBuffer] = {}
        self._views: dict[str, tuple[torch.Tensor, torch.Tensor] | None] = {}

    def set_rows(self, row_parts: list[RowParts]) -> None:
        """row_parts[i]: (slot, weight) of each adapter batch row i sums, ((slot, 1.0),) for a plain adapter
        row (None: base only). Views are rebuilt lazily, module by module, only when the rows' keys differ
        from the previous batch's."""
        version = self.slots.slot_version
        keys = tuple(None if parts is None else tuple((s, version[s], w) for s, w in parts) for parts in row_parts)
        if keys != self.row_keys:
            self.row_keys, self._views = keys, {}

    def views(self, name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(a_rows [B, in, r], b_rows [B, r, out]) of this module for the current rows, or None when no
        row's adapter targets it. A steady batch finds them cached: entering inference mode on every module
        call cost a tenth of a batch-1 decode step, so only a rebuild does."""
        views = self._views.get(name, _MISSING)
        return self._build_views(name) if views is _MISSING else views

    @torch.inference_mode()  # buffers are updated in place, like the slot stacks they copy from
    def _build_views(self, name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        stack = self.slots.stacks.get(name)
        keys = [None if k is None else tuple(part for part in k if part[0] in stack.slots) or None
                for k in self.row_keys] if stack is not None else []  # parts whose adapter targets the module
        if not any(keys):
            self._views[name] = None
            return None
        rank, rows = self.slots.rank, len(keys)
        width = rank * max(len(k) for k in keys if k is not None)
        buffer = self._buffer(name, rows, width, stack.a_cat.shape[1], stack.b_cat.shape[1])
        for row, key in enumerate(keys):
            if buffer.keys[row] == key:
                continue
            buffer.a[row].zero_()
            buffer.b[row].zero_()
            for block, (slot, _, weight) in enumerate(key or ()):
                lo, col = slot * rank, block * rank
                buffer.a[row, :, col:col + rank].copy_(stack.a_cat[lo:lo + rank].t())
                b = buffer.b[row, col:col + rank].copy_(stack.b_cat[lo:lo + rank])
                if weight != 1.0:  # a combination's part (a plain adapter row keeps its slot's values exactly)
                    b.mul_(weight)
            buffer.keys[row] = key
        views = (buffer.a[:rows], buffer.b[:rows])
        self._views[name] = views
        return views

    def _buffer(self, name: str, rows: int, rank: int, in_features: int, out_features: int) -> _RowBuffer:
        """A buffer of at least `rows` rows and exactly `rank` columns (a new width starts a new buffer)."""
        buffer = self._buffers.get(name)
        if buffer is None or buffer.a.shape[0] < rows or buffer.a.shape[2] != rank:
            capacity = rows if buffer is None or buffer.a.shape[2] != rank else max(rows, buffer.a.shape[0])
            slots = self.slots
            buffer = _RowBuffer(
                a=torch.zeros(capacity, in_features, rank, device=slots.device, dtype=self.dtype),
                b=torch.zeros(capacity, rank, out_features, device=slots.device, dtype=self.dtype),
                keys=[None] * capacity,
            )
            self._buffers[name] = buffer
        return buffer

    def apply(self, name: str, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """out [B, 1, out] += each row's delta for x [B, 1, in] (a decode step)."""
        views = self.views(name)
        if views is None:
            return out
        a_rows, b_rows = views
        if x.dtype == self.dtype:
            return out.baddbmm_(torch.bmm(x, a_rows), b_rows)
        return out.add_(torch.bmm(torch.bmm(x.to(self.dtype), a_rows), b_rows))

    def clear(self) -> None:
        """Forget every buffer (their memory too): the slots' layout changed or the server is idle."""
        self._buffers, self._views, self.row_keys = {}, {}, ()
