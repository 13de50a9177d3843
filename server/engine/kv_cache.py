"""A KV cache the scheduler manages: preallocated per layer as [num_slots, kv_heads, max_len, head_dim].

Each running request owns one slot. HF's attention modules call `update(k, v, layer_idx)` (the Cache
protocol); before every forward the runner `bind`s which slot and start position each batch row uses.
Rows shorter than the step's longest are right-padded; their padding is written to one scratch slot past
the real ones (never read), so a row that starts late (after a prefix adapter's positions) and is padded
to a long neighbour's length never runs past the end of its own slot.
"""

from __future__ import annotations

from typing import Sequence

import torch


class SlotKVCache:
    def __init__(self, num_layers: int, num_slots: int, kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        shape = (num_slots + 1, kv_heads, max_len, head_dim)  # + the scratch slot for padding
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.num_slots = num_slots
        self.max_len = max_len
        self._slots: torch.Tensor | None = None
        self._write_slots: torch.Tensor | None = None
        self._write_pos: torch.Tensor | None = None
        self._kv_len = 0
        self._contiguous = False

    @property
    def bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    def bind(self, slots: torch.Tensor, starts: torch.Tensor, query_len: int, kv_len: int,
             lengths: torch.Tensor | None = None, in_order: bool = False) -> None:
        """slots, starts, lengths: [B] on the cache's device. Row b writes its `lengths[b]` new tokens (None:
        every row all `query_len`) at positions starts[b] .. of slot slots[b], its padding to the scratch
        slot. `kv_len`, the key length every row attends over (the furthest real end position), and
        `in_order` (the rows are slots 0 .. B-1) come from the caller's host-side lists: reading them off
        device tensors would cost a host sync per step."""
        if kv_len > self.max_len:
            raise ValueError(f"sequence of {kv_len} tokens exceeds the KV cache length {self.max_len}")
        self._slots, self._kv_len, self._contiguous = slots, kv_len, in_order
        steps = torch.arange(query_len, device=starts.device)
        positions = starts[:, None] + steps  # [B, S]
        if lengths is None:
            self._write_slots, self._write_pos = slots[:, None], positions
        else:
            padding = steps[None, :] >= lengths[:, None]
            self._write_slots = torch.where(padding, self.num_slots, slots[:, None])
            self._write_pos = torch.where(padding, 0, positions)

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, cache_kwargs=None):
        """key, value: [B, kv_heads, S, head_dim] -> the full [B, kv_heads, L, head_dim] of each row's slot."""
        slots, write_slots, pos = self._slots, self._write_slots, self._write_pos
        k_cache, v_cache = self.keys[layer_idx], self.values[layer_idx]
        k_cache[write_slots, :, pos] = key.transpose(1, 2)  # indexed view is [B, S, kv_heads, head_dim]
        v_cache[write_slots, :, pos] = value.transpose(1, 2)
        if self._contiguous:  # rows in slots 0..B-1, in order: a view of the cache, not a gathered copy
            batch = slots.shape[0]
            return k_cache[:batch, :, : self._kv_len], v_cache[:batch, :, : self._kv_len]
        return k_cache[slots, :, : self._kv_len], v_cache[slots, :, : self._kv_len]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self._kv_len

    def write_prefix(self, slot: int, prefix: tuple[tuple[torch.Tensor, torch.Tensor], ...]) -> None:
        """Put a prefix adapter's per-layer keys/values ([kv_heads, V, head_dim] each) at positions 0 .. V-1."""
        length = prefix[0][0].shape[1]
        for (keys, values), k_cache, v_cache in zip(prefix, self.keys, self.values):
            k_cache[slot, :, :length] = keys
            v_cache[slot, :, :length] = values

    def copy_slot(self, src: int, dsts: Sequence[int], length: int) -> None:
        """Copy the first `length` positions of slot `src` into every slot of `dsts`: to keep running rows
        compact (one destination), and for a request with n > 1 choices, which prefills its prompt once, in
        `src`, each other choice decoding on from a copy."""
        index = torch.tensor(list(dsts), device=self.keys[0].device)
        for k_cache, v_cache in zip(self.keys, self.values):
            k_cache[index, :, :length] = k_cache[src, :, :length]  # [kv_heads, length, head_dim], broadcast
            v_cache[index, :, :length] = v_cache[src, :, :length]
