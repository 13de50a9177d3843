"""Merge mode (`--merge`): one adapter folded into the base weights at a time, for single-tenant traffic.

With one hot adapter, a merged base runs at base-only speed (no LoRA matmuls at all). The scheduler
runs only requests of the merged adapter while any are running, and swaps (unmerge the old, merge the
new) when the batch has drained and the next request wants another adapter. With several hot adapters
this loses to the mixed batch (S-LoRA's measurement): it is a mode, not the default.
Every layer the merged adapter changes gets back, on a swap, a copy of its weights taken before the
merge: subtracting a LoRA delta again is not exact (in bfloat16 each merge/unmerge pair moved the base by
up to one rounding step, so a long-lived server's base drifted swap by swap), dividing an IA3 vector out
is not exact either, and a freeze adapter replaces weights. The copies live in host memory (on a GPU
they would take device memory for as long as the adapter is merged) and are one adapter's layers at most.
A per-request combination of adapters is not served here (the routes answer 400): merged, every request
would be its own swap. `training merge` makes one folder of a combination, which merges like any other.
"""

from __future__ import annotations

import logging

import torch

from adapters.merge import ia3_merge_into, merge_into
from server.engine.base_model import BaseModel
from server.engine.loaded import Combination, LoadedAdapter

log = logging.getLogger(__name__)


class Merger:
    def __init__(self, base: BaseModel) -> None:
        self.base = base
        self.merged: LoadedAdapter | None = None
        self.swaps = 0
        self._saved: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}  # merged layers' weight, bias, on the host

    @torch.inference_mode()
    def switch_to(self, adapter: LoadedAdapter | None) -> None:
        """Make `adapter` (None: the plain base) the merged one. Caller holds the model lock."""
        if isinstance(adapter, Combination):
            raise ValueError("merge mode merges one adapter at a time, not a combination of adapters")
        if adapter is self.merged:
            return
        if self.merged is not None:
            self._restore()
        if adapter is not None:
            self._merge(adapter)
        log.info("merged adapter: %s -> %s", getattr(self.merged, "name", None), getattr(adapter, "name", None))
        self.merged = adapter
        self.swaps += 1

    def _merge(self, adapter: LoadedAdapter) -> None:
        for module, weights in adapter.lora.items():
            layer = self._save(module)
            merge_into(layer.base.weight, weights)
            layer.repack()
        for module, scale in adapter.ia3.items():
            layer = self._save(module)
            ia3_merge_into(layer.base.weight, layer.base.bias, scale)
            layer.repack()
        for module, weights in adapter.dense.items():
            layer = self._save(module)
            layer.base.weight.copy_(weights.weight)
            if weights.bias is not None:
                layer.base.bias.copy_(weights.bias)
            layer.repack()

    def _save(self, module: str):
        """The wrapped layer, after keeping a host copy of its weight and bias for the unmerge (once per
        merge: a layer that two of the adapter's methods touch keeps its original)."""
        layer = self.base.model.get_submodule(module)
        if module not in self._saved:
            bias = layer.base.bias
            self._saved[module] = (_host_copy(layer.base.weight), None if bias is None else _host_copy(bias))
        return layer

    def _restore(self) -> None:
        """Every layer the merged adapter changed gets its saved weights back, bit for bit."""
        for module, (weight, bias) in self._saved.items():
            layer = self.base.model.get_submodule(module)
            layer.base.weight.copy_(weight)
            if bias is not None:
                layer.base.bias.copy_(bias)
            layer.repack()
        self._saved = {}


def _host_copy(tensor: torch.Tensor) -> torch.Tensor:
    """A copy in host memory (pinned when a GPU will copy it back)."""
    copy = tensor.detach().to("cpu", copy=True)
    return copy.pin_memory() if tensor.device.type == "cuda" else copy
