"""LoRA on top of a frozen nn.Linear, chosen per batch row.

The base matmul runs once for the whole batch; each row then gets the delta of its own adapter.
This is the plain reference form (one small matmul pair per distinct adapter in the batch); the
batched kernels of the multi-adapter engine are checked against it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from server.engine.loaded import LoadedAdapter


class ActiveAdapters:
    """Which adapter each batch row uses during the next forward; shared by every LoraLinear.

    groups: (adapter, row indices [n]) for each distinct adapter; rows without adapter are absent.
    """

    def __init__(self) -> None:
        self.groups: list[tuple[LoadedAdapter, torch.Tensor | None]] = []

    def set_rows(self, rows: list[LoadedAdapter | None], device: torch.device) -> None:
        """rows[i] is the adapter of batch row i (None: base only). A single shared adapter skips indexing."""
        distinct = {id(a): a for a in rows if a is not None}
        if len(distinct) == 1 and all(a is not None for a in rows):
            self.groups = [(next(iter(distinct.values())), None)]
            return
        self.groups = [
            (adapter, torch.tensor([i for i, a in enumerate(rows) if a is adapter], device=device))
            for adapter in distinct.values()
        ]

    def clear(self) -> None:
        self.groups = []


class LoraLinear(nn.Module):
    """y = base(x) + scaling * B(A(x)) for the rows whose adapter targets this module."""

    def __init__(self, base: nn.Linear, name: str, active: ActiveAdapters) -> None:
        super().__init__()
        self.base = base
        self.name = name
        self.active = active

    @property
    def weight(self) -> torch.Tensor:  # models that read `.weight` (tied embeddings) still work
        return self.base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, S, in] -> out: [B, S, out]
        out = self.base(x)
        for adapter, rows in self.active.groups:
            weights = adapter.lora.get(self.name)
            if weights is None:
                continue
            if rows is None:
                out = out + F.linear(F.linear(x, weights.a), weights.b) * weights.scaling
            else:
                out = out.index_add(0, rows, F.linear(F.linear(x[rows], weights.a), weights.b) * weights.scaling)
        return out


def wrap_linears(model: nn.Module, active: ActiveAdapters) -> list[str]:
    """Replace every nn.Linear in `model` by a LoraLinear (names as PEFT writes them). Returns the names."""
    targets = [(name, module) for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LoraLinear(module, name, active))
    return [name for name, _ in targets]
