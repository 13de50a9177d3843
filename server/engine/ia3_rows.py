"""IA3 per batch row: each row's linears rescale their input or output by its own adapter's vectors.

For every module some row's IA3 adapter scales, one [B, 1, size] tensor holds each row's vector (ones for
rows of other adapters, LoRA ones included, and of the base), so a mixed batch pays one broadcast multiply
per scaled module. The tensors are rebuilt only when the batch's adapters change (decode steps keep them).
"""

from __future__ import annotations

import torch

from server.engine.loaded import LoadedAdapter


class IA3Rows:
    def __init__(self) -> None:
        self.on = False  # whether the current batch has IA3 rows
        self.inputs: dict[str, torch.Tensor] = {}  # module -> [B, 1, in]
        self.outputs: dict[str, torch.Tensor] = {}  # module -> [B, 1, out]
        self._rows: tuple[LoadedAdapter | None, ...] | None = None  # the batch the tensors were built for

    def set_rows(self, rows: list[LoadedAdapter | None], device: torch.device) -> None:
        key = tuple(a if a is not None and a.ia3 else None for a in rows)  # holds the adapters: ids stay unique
        self.on = any(a is not None for a in key)
        if not self.on or key == self._rows:
            return
        self.inputs, self.outputs = {}, {}
        for row, adapter in enumerate(key):
            if adapter is None:
                continue
            for module, scale in adapter.ia3.items():
                table = self.inputs if scale.on_input else self.outputs
                if module not in table:
                    table[module] = torch.ones(len(rows), 1, scale.size, device=device, dtype=scale.vector.dtype)
                table[module][row, 0] = scale.vector
        self._rows = key

    def clear(self) -> None:
        """End of a forward; the tensors stay for a next batch of the same adapters."""
        self.on = False

    def scale_input(self, name: str, x: torch.Tensor) -> torch.Tensor:
        scale = self.inputs.get(name) if self.on else None
        return x if scale is None else x * scale

    def scale_output(self, name: str, out: torch.Tensor) -> torch.Tensor:
        scale = self.outputs.get(name) if self.on else None
        return out if scale is None else out.mul_(scale)
