"""Freeze adapters per batch row: their rows of a trained linear take that adapter's whole weights.

The base matmul has run for every row; for each freeze adapter in the batch that trained this module,
its rows' outputs are recomputed with its weights and written over (one matmul on those rows only).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from adapters.dense import DenseWeights
from server.engine.host import upload
from server.engine.loaded import LoadedAdapter


class DenseRows:
    def __init__(self) -> None:
        self.on = False
        self.by_module: dict[str, list[tuple[DenseWeights, torch.Tensor]]] = {}  # module -> (weights, rows)

    def set_rows(self, rows: list[LoadedAdapter | None], device: torch.device) -> None:
        distinct = {id(a): a for a in rows if a is not None and a.dense}
        self.on = bool(distinct)
        self.by_module = {}
        for adapter in distinct.values():
            index = upload(torch.tensor([i for i, a in enumerate(rows) if a is adapter]), device)
            for module, weights in adapter.dense.items():
                self.by_module.setdefault(module, []).append((weights, index))

    def clear(self) -> None:
        self.on = False
        self.by_module = {}

    def replace(self, name: str, x: torch.Tensor, out: torch.Tensor, base_bias: torch.Tensor | None) -> torch.Tensor:
        """out with the rows of every freeze adapter that trained `name` recomputed. x: [B, S, in]."""
        for weights, rows in self.by_module.get(name, ()) if self.on else ():
            bias = weights.bias if weights.bias is not None else base_bias
            out.index_copy_(0, rows, F.linear(x.index_select(0, rows), weights.weight, bias))
        return out
