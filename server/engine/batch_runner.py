"""One forward for many sequences at once, each at its own position, with its own adapter.

Rows are right-padded to the longest query of the step; a 4D additive mask lets query t of row b see
keys 0 .. starts[b]+t of its own slot only. Logits are taken at each row's last real token, and at every
one of its new tokens for the rows that ask (`every_position`: a prompt's logprobs, for echo); only those
rows pay for the extra lm_head rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from server.engine.base_model import BaseModel
from server.engine.decoder import make_decoder
from server.engine.host import upload
from server.engine.kv_cache import SlotKVCache
from server.engine.loaded import LoadedAdapter


@dataclass(frozen=True)
class RowInput:
    slot: int
    start: int  # tokens already in this slot's cache
    tokens: list[int]  # new tokens of this step (the prompt at prefill, one token at decode)
    adapter: LoadedAdapter | None  # whose LoRA applies to this row
    # At a request's prefill, the prompt-learning adapter whose positions go first: prompt tuning's virtual
    # tokens are the row's first tokens (placeholders whose embeddings are replaced); a prefix adapter's keys
    # and values are written to positions 0 .. V-1 of the slot, and `start` is V.
    prompt: LoadedAdapter | None = None
    every_position: bool = False  # also return logits at each of `tokens` (a prompt's logprobs)


@dataclass(frozen=True)
class StepLogits:
    last: torch.Tensor  # [B, vocab]: at each row's last new token
    every: dict[int, torch.Tensor]  # row index -> [len(tokens), vocab], for the rows with `every_position`


@dataclass(frozen=True)
class _StepTensors:
    input_ids: torch.Tensor  # [B, S], right-padded
    slots: torch.Tensor  # [B]
    starts: torch.Tensor  # [B]
    lengths: torch.Tensor  # [B]: real new tokens per row


def _step_tensors(rows: list[RowInput], query_len: int, pad: int, device: torch.device) -> _StepTensors:
    """The step's token ids and row indices, built as ONE host tensor and sent in one copy (host.upload):
    a tensor per list would be a host-to-device copy and a sync each."""
    step = upload(torch.tensor([r.tokens + [pad] * (query_len - len(r.tokens)) + [r.slot, r.start, len(r.tokens)]
                                for r in rows]), device)
    return _StepTensors(step[:, :query_len], *step.unbind(1)[query_len:])


class BatchRunner:
    def __init__(self, base: BaseModel, num_slots: int, max_len: int, lean: bool = True) -> None:
        """`lean`: use the lean decoder forward where the architecture has one (decoder.py)."""
        if not base.can_generate:
            raise ValueError("batched generation needs a causal LM base")
        self.base = base
        config = base.model.config
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        self.cache = SlotKVCache(config.num_hidden_layers, num_slots, kv_heads, max_len, head_dim,
                                 base.backend.dtype, base.backend.device)
        self.decoder = make_decoder(base.model, lean, base.fused)
        self.lm_head = base.model.get_output_embeddings()
        self.mask_value = torch.finfo(base.backend.dtype).min

    def forward(self, rows: list[RowInput]) -> torch.Tensor:
        """-> logits [B, vocab] at each row's last new token."""
        return self.forward_full(rows).last

    @torch.inference_mode()
    def forward_full(self, rows: list[RowInput]) -> StepLogits:
        """-> logits at each row's last new token, and at all of them for the rows that ask."""
        device = self.base.backend.device
        query_len = max(len(r.tokens) for r in rows)
        step = _step_tensors(rows, query_len, self.base.tokenizer.pad_token_id or 0, device)
        kv_len = max(r.start + len(r.tokens) for r in rows)
        full = all(len(r.tokens) == query_len for r in rows)
        in_order = all(r.slot == i for i, r in enumerate(rows))
        self.cache.bind(step.slots, step.starts, query_len, kv_len, None if full else step.lengths, in_order)
        positions = step.starts[:, None] + torch.arange(query_len, device=device)  # [B, S]
        keys = torch.arange(kv_len, device=device)
        visible = keys[None, None, :] <= positions[:, :, None]  # [B, S, L]
        mask = torch.zeros(visible.shape, dtype=self.base.backend.dtype, device=device)
        mask = mask.masked_fill(~visible, self.mask_value)[:, None]  # [B, 1, S, L]
        embeds = self._prompt_learning(rows)
        layer_rows = [r.adapter if r.adapter is not None and r.adapter.in_layers else None for r in rows]
        with self.base.adapters_for_rows(layer_rows):
            hidden = self.decoder(step.input_ids, positions, mask, self.cache, embeds)  # [B, S, hidden]
            final = hidden[:, -1] if full else hidden[torch.arange(len(rows), device=device), step.lengths - 1]
            logits = self.lm_head(final[:, None]).squeeze(1)  # [B, vocab]
        every = {}
        for index, row in enumerate(rows):
            if row.every_position:  # alone: the head's LoRA rows (if an adapter targets it) are this row's
                with self.base.adapters_for_rows([layer_rows[index]]):
                    every[index] = self.lm_head(hidden[index : index + 1, : len(row.tokens)]).squeeze(0)
        return StepLogits(logits, every)

    def _prompt_learning(self, rows: list[RowInput]) -> list[tuple[int, torch.Tensor]]:
        """Write prefix adapters' keys/values into their rows' slots; -> (row, virtual tokens) to embed."""
        embeds = []
        for index, row in enumerate(rows):
            adapter = row.prompt
            if adapter is None:
                continue
            if adapter.virtual_tokens is not None:
                if row.start != 0 or len(row.tokens) <= adapter.num_virtual_tokens:
                    raise ValueError("a prompt-tuning row starts with its virtual tokens' placeholders")
                embeds.append((index, adapter.virtual_tokens))
            elif adapter.prefix:
                if row.start != adapter.num_virtual_tokens:
                    raise ValueError("a prefix-tuning row starts right after its prefix")
                self.cache.write_prefix(row.slot, adapter.prefix)
        return embeds
