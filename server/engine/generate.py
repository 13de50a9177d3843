"""The reference decode loop for one request: prefill the prompt, then one token per step with HF's
DynamicCache, LoRA adapters only. The batched scheduler is tested against it (prompt-learning adapters
are tested against PEFT's own generate instead)."""

from __future__ import annotations

from typing import Iterator

import torch
from transformers import DynamicCache

from server.engine.base_model import BaseModel
from server.engine.decode_state import DecodeState, TextDelta
from server.engine.loaded import LoadedAdapter
from server.engine.sampling import SamplingParams

__all__ = ["TextDelta", "eos_ids", "generate_tokens"]


def eos_ids(base: BaseModel) -> set[int]:
    ids = base.model.generation_config.eos_token_id
    if ids is None:
        ids = base.tokenizer.eos_token_id
    ids = ids if isinstance(ids, list) else [ids]
    return {int(i) for i in ids if i is not None}


@torch.inference_mode()
def generate_tokens(
    base: BaseModel, prompt_ids: list[int], params: SamplingParams, adapter: LoadedAdapter | None
) -> Iterator[TextDelta]:
    """Yield text deltas until eos, a stop string, or max_tokens. Closing the iterator stops decoding."""
    if adapter is not None and adapter.num_virtual_tokens:
        raise ValueError("the reference loop serves LoRA adapters only; prompt-learning adapters run in the scheduler")
    device = base.backend.device
    state = DecodeState(params, base.tokenizer, eos_ids(base), device)
    cache = DynamicCache()
    with base.adapters_for_rows([adapter]):
        step_input = torch.tensor([prompt_ids], device=device)
        while True:
            out = base.model(input_ids=step_input, past_key_values=cache, use_cache=True, logits_to_keep=1)
            delta = state.step(out.logits[0, -1])
            yield delta
            if state.finished:
                return
            step_input = torch.tensor([[delta.token_id]], device=device)
