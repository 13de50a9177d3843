"""LoRA on top of a frozen nn.Linear, chosen per batch row.

The base matmul runs once for the whole batch; each row then gets the delta of its own adapter.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from server.engine.backend import LinearFn, PackFn, no_pack
from server.engine.dense_rows import DenseRows
from server.engine.host import upload
from server.engine.ia3_rows import IA3Rows
from server.engine.loaded import LoadedAdapter, RowModel
from server.engine.lora_rows import RowWeights
from server.engine.lora_slots import LoraSlots
from server.engine.quant_kernels import QuantMatrix, quant_linear

# Decode batches of at most this many rows, with at least one distinct adapter per two adapter rows,
# take the per-row kernel; it keeps a copy of each row's blocks, so the bound caps that memory.
PER_ROW_MAX_ROWS = 64


class ActiveAdapters:
    """Which adapter each batch row uses during the next forward; shared by every LoraLinear.

    Two kernels, chosen once at start-up: `loop` (the reference: one matmul pair per distinct adapter
    in the batch, on its rows, gathered and scattered back) and `stacked`, the fast path. Stacked decode
    steps (one token per row) use LoraSlots, two matmuls per module for any adapter mix, in one of two
    forms picked per batch: per-row (lora_rows.py: each row times its own adapter, for batches whose
    rows mostly use different adapters) or masked (every row times the batch's slot block, other
    rows' blocks zeroed: each adapter read once, for batches where many rows share few adapters).
    Stacked prefill steps (compute-bound) run each run of consecutive rows sharing an adapter on views
    of x and out: two matmuls per run, no gather, no scatter.
    IA3 rows (ia3_rows.py) rescale the input or output of their adapter's modules, and freeze rows
    (dense_rows.py) take their adapter's trained weights in place of the base's, with either kernel.
    A combination row (loaded.Combination) gets sum_i w_i * delta_i of its parents, each read from its own
    slot: the masked kernel's row mask holds w_i on parent i's block (1 for a plain adapter row), the
    per-row kernel concatenates the parents' blocks with w_i folded into B, prefill runs add each parent
    with alpha = w_i * scaling_i, and the loop reference adds w_i * delta_i per parent.
    """

    def __init__(self, slots: LoraSlots | None = None) -> None:
        self.slots = slots
        self.ia3 = IA3Rows()
        self.dense = DenseRows()
        self.ia3_or_freeze = False  # this batch has IA3 or freeze rows (one check per layer call when it has not)
        self.row_weights = RowWeights(slots) if slots is not None else None
        self.per_row = False  # stacked decode: per-row kernel (True) or masked (False) for this batch
        self.groups: list[tuple[LoadedAdapter, torch.Tensor | None, float]] = []  # loop kernel: (adapter, rows, w)
        self.runs: list[tuple[RowModel, int, int]] = []  # stacked prefill: (row model, first row, end row)
        self.row_mask: torch.Tensor | None = None  # stacked kernel: [B, width]
        self.width = 0
        self.gather: torch.Tensor | None = None  # stack rows of the batch's slots, when not a leading block
        self.batch_slots: set[int] = set()
        self.slot_of: dict[int, int] = {}  # stacked kernel: id(adapter) -> its slot, for the batch's adapters
        # per-module (a, b) the decode kernel reads, or None where the batch has no weights; valid while
        # the slots' generation and the batch's layout (width, gathered slots) stay the same
        self._views: dict[str, tuple[torch.Tensor, torch.Tensor] | None] = {}
        self._layout: tuple | None = None

    def set_rows(self, rows: list[RowModel | None], device: torch.device) -> None:
        """rows[i] is the adapter (or combination) of batch row i (None: base only)."""
        self.ia3.set_rows(rows, device)
        self.dense.set_rows(rows, device)
        self.ia3_or_freeze = self.ia3.on or self.dense.on
        rows = [a if a is not None and a.lora_parts else None for a in rows]  # the LoRA kernels' rows
        distinct = {id(a): a for a in rows if a is not None}
        if not distinct:
            self._clear_lora()
            return
        if self.slots is not None:
            parents = {id(p): p for model in distinct.values() for p, _ in model.lora_parts}
            self._set_stacked(rows, list(parents.values()), device)
            self.runs = _runs(rows)
            return
        everyone = len(distinct) == 1 and all(a is not None for a in rows)
        self.groups = []
        for model in distinct.values():
            index = None if everyone else torch.tensor([i for i, a in enumerate(rows) if a is model], device=device)
            self.groups += [(adapter, index, weight) for adapter, weight in model.lora_parts]

    def _set_stacked(self, rows: list[RowModel | None], adapters: list[LoadedAdapter],
                     device: torch.device) -> None:
        """Decode reads the batch's slots from the stacks: the leading block of the stacks up to the highest
        slot in the batch when that is at most twice the batch's own blocks, else only the batch's blocks,
        gathered per module (many resident adapters, few of them in this batch)."""
        slot_of = self.slot_of = self.slots.slots_for(adapters)
        rank = self.slots.rank
        batch_slots = sorted(set(slot_of.values()))
        self.batch_slots = set(batch_slots)
        adapter_rows = sum(a is not None for a in rows)
        self.per_row = len(rows) <= PER_ROW_MAX_ROWS and 2 * len(adapters) >= adapter_rows
        if self.per_row:
            self.row_weights.set_rows([None if a is None else tuple((slot_of[id(p)], w) for p, w in a.lora_parts)
                                       for a in rows])
            self.row_mask = None
            return
        if (batch_slots[-1] + 1) <= 2 * len(batch_slots):
            column = {slot: slot for slot in batch_slots}
            self.width, self.gather = (batch_slots[-1] + 1) * rank, None
        else:
            column = {slot: i for i, slot in enumerate(batch_slots)}
            self.width = len(batch_slots) * rank
            self.gather = upload(torch.tensor([s * rank + j for s in batch_slots for j in range(rank)]), device)
        mask = torch.zeros(len(rows), self.width, dtype=self.slots.dtype)  # built on the host, sent once
        for row, model in enumerate(rows):
            for adapter, weight in model.lora_parts if model is not None else ():
                block = column[slot_of[id(adapter)]]
                mask[row, block * rank:(block + 1) * rank] += weight  # 1 for a plain adapter row
        self.row_mask = upload(mask, device)  # [B, width]: decode steps have one token per row
        layout = (self.slots.generation, self.width, tuple(batch_slots) if self.gather is not None else None)
        if layout != self._layout:
            self._views, self._layout = {}, layout

    def _decode_views(self, name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        if name not in self._views:
            stack = self.slots.stacks.get(name)
            if stack is None or not (stack.slots & self.batch_slots):
                self._views[name] = None
            elif self.gather is None:
                self._views[name] = (stack.a_cat[: self.width], stack.b_cat[: self.width])
            else:
                self._views[name] = (stack.a_cat.index_select(0, self.gather), stack.b_cat.index_select(0, self.gather))
        return self._views[name]

    def clear(self) -> None:
        self.ia3.clear()
        self.dense.clear()
        self.ia3_or_freeze = False
        self._clear_lora()

    def _clear_lora(self) -> None:
        self.groups = []
        self.runs = []
        self.row_mask = None
        self.gather = None
        self.batch_slots = set()
        self.per_row = False
        self.slot_of = {}

    def apply(self, name: str, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """out + this module's LoRA delta for every row. x: [B, S, in], out: [B, S, out]."""
        if self.batch_slots:  # the stacked kernel, with at least one adapter row in this batch
            if x.shape[1] > 1:  # prefill is compute-bound: each adapter only on its own rows
                return self._apply_runs(name, x, out)
            if self.per_row:  # decode, rows on mostly distinct adapters: each row times its own blocks
                return self.row_weights.apply(name, x, out)
            # Decode, many rows on few adapters: read each of the batch's adapters once, two matmuls.
            views = self._decode_views(name)
            if views is None:
                return out
            a_cat, b_cat = views
            shrunk = F.linear(x.view(-1, x.shape[-1]), a_cat).mul_(self.row_mask)  # [B, width]
            out.view(-1, out.shape[-1]).addmm_(shrunk, b_cat)
            return out
        for adapter, rows, weight in self.groups:  # the reference
            weights = adapter.lora.get(name)
            if weights is None:
                continue
            scale = weights.scaling * weight
            if rows is None:
                out = out + F.linear(F.linear(x, weights.a), weights.b) * scale
            else:
                out.index_add_(0, rows, F.linear(F.linear(x[rows], weights.a), weights.b) * scale)
        return out


    def _apply_runs(self, name: str, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Each run's adapters on its rows, read from their slots (the adapters' own weights may be in host
        memory: BaseModel.lora_home), each at its own rank, not the slots' padded one."""
        stack = self.slots.stacks.get(name)
        if stack is None:
            return out
        out = out.contiguous()  # rows of a contiguous [B, S, out] are views we can add into
        for model, lo, hi in self.runs:
            for adapter, weight in model.lora_parts:
                slot, weights = self.slot_of[id(adapter)], adapter.lora.get(name)
                if weights is None:
                    continue
                first = slot * self.slots.rank
                a, b = stack.a_cat[first:first + weights.rank], stack.b_cat[first:first + weights.rank]
                shrunk = F.linear(x[lo:hi].reshape(-1, x.shape[-1]), a)  # [rows * S, r]
                out[lo:hi].view(-1, out.shape[-1]).addmm_(shrunk, b, alpha=weight)  # b: scaling * B.T
        return out


def _runs(rows: list[RowModel | None]) -> list[tuple[RowModel, int, int]]:
    """Maximal runs of consecutive rows with the same adapter (rows without one are skipped)."""
    runs: list[tuple[RowModel, int, int]] = []
    for index, adapter in enumerate(rows):
        if adapter is None:
            continue
        if runs and runs[-1][0] is adapter and runs[-1][2] == index:
            runs[-1] = (adapter, runs[-1][1], index + 1)
        else:
            runs.append((adapter, index, index + 1))
    return runs


class LoraLinear(nn.Module):
    """y = base(x) + scaling * B(A(x)) for the rows whose LoRA adapter targets this module; rows of an IA3
    adapter get base(x * l) or base(x) * l instead, rows of a freeze adapter that trained it x @ W_trained.T + b.

    The base matmul goes through `linear` (the backend's kernel, see backend.py) on `pack(weight)`, the
    weight in the layout that kernel reads fastest. The plain weight stays `base.weight` (tied
    embeddings, merges); whoever changes it calls `repack()`. On a quantized base (`use_quantized`)
    `kernel_weight` is a QuantMatrix, `base.weight` is gone, and nothing may repack.
    """

    def __init__(self, base: nn.Linear, name: str, active: ActiveAdapters, linear: LinearFn = F.linear,
                 pack: PackFn = no_pack) -> None:
        super().__init__()
        self.base = base
        self.name = name
        self.active = active
        self.linear = linear
        self.pack = pack
        self.kernel_weight = pack(base.weight)
        self.fused = None  # the FusedLinear (fused.py) whose one matmul computes this module's output, if any

    @property
    def weight(self) -> torch.Tensor:  # models that read `.weight` (tied embeddings) still work
        return self.base.weight

    def repack(self) -> None:
        if self.base.weight is None:
            raise RuntimeError(f"{self.name}: a quantized base matrix cannot be repacked (no full-precision weight)")
        self.kernel_weight = self.pack(self.base.weight)
        if self.fused is not None:
            self.fused.repack()

    def use_quantized(self, matrix: QuantMatrix) -> None:
        """Run the base matmul on `matrix` (server/engine/quant_kernels.py) and drop the plain weight."""
        self._parameters.pop("kernel_weight", None)  # no_pack made it the weight Parameter itself
        self.linear, self.pack, self.kernel_weight = quant_linear, no_pack, matrix
        self.base.weight = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, S, in] -> [B, S, out]
        if not self.active.ia3_or_freeze:  # LoRA and base rows only: the hot path
            return self.active.apply(self.name, x, self.linear(x, self.kernel_weight, self.base.bias))
        ia3 = self.active.ia3
        x = ia3.scale_input(self.name, x)
        out = ia3.scale_output(self.name, self.linear(x, self.kernel_weight, self.base.bias))
        out = self.active.dense.replace(self.name, x, out, self.base.bias)
        return self.active.apply(self.name, x, out)


def wrap_linears(model: nn.Module, active: ActiveAdapters, linear: LinearFn = F.linear,
                 pack: PackFn = no_pack) -> list[str]:
    """Replace every nn.Linear in `model` by a LoraLinear (names as PEFT writes them). Returns the names."""
    targets = [(name, module) for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LoraLinear(module, name, active, linear, pack))
    return [name for name, _ in targets]
