"""Merge mode (`--merge`): one adapter folded into the base weights at a time, for single-tenant traffic.

With one hot adapter, a merged base runs at base-only speed (no LoRA matmuls at all). The scheduler
runs only requests of the merged adapter while any are running, and swaps (unmerge the old, merge the
new) when the batch has drained and the next request wants another adapter. With several hot adapters
this loses to the mixed batch (S-LoRA's measurement): it is a mode, not the default.
"""

from __future__ import annotations

import logging

import torch

from adapters.merge import merge_into, unmerge_from
from server.engine.base_model import BaseModel
from server.engine.loaded import LoadedAdapter

log = logging.getLogger(__name__)


class Merger:
    def __init__(self, base: BaseModel) -> None:
        self.base = base
        self.merged: LoadedAdapter | None = None
        self.swaps = 0

    @torch.inference_mode()
    def switch_to(self, adapter: LoadedAdapter | None) -> None:
        """Make `adapter` (None: the plain base) the merged one. Caller holds the model lock."""
        if adapter is self.merged:
            return
        if self.merged is not None:
            self._apply(self.merged, unmerge_from)
        if adapter is not None:
            self._apply(adapter, merge_into)
        log.info("merged adapter: %s -> %s", getattr(self.merged, "name", None), getattr(adapter, "name", None))
        self.merged = adapter
        self.swaps += 1

    def _apply(self, adapter: LoadedAdapter, op) -> None:
        for module, weights in adapter.lora.items():
            layer = self.base.model.get_submodule(module)
            op(layer.base.weight, weights)
            layer.repack()
