"""One request's decode loop: prefill the prompt, then one token per step with a KV cache.

Requests are served one at a time here (the caller holds the engine lock); the multi-adapter
scheduler replaces this loop with continuous batching and is tested against it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch
from transformers import DynamicCache

from server.engine.base_model import BaseModel
from server.engine.loaded import LoadedAdapter
from server.engine.sampling import Sampler, SamplingParams

REPLACEMENT_CHAR = "\ufffd"  # what a partial UTF-8 sequence decodes to; wait for the next token


@dataclass(frozen=True)
class TextDelta:
    """What one step adds to the visible completion text (may be empty while a character is partial)."""

    text: str
    token_id: int
    finish_reason: str | None  # None while running, then "stop" or "length"
    eos: bool = False  # the step sampled end-of-sequence: it ends the request, it is not completion text


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
    device = base.backend.device
    sampler = Sampler(params, device)
    stop_ids = set() if params.ignore_eos else eos_ids(base)
    cache = DynamicCache()
    tokens: list[int] = []
    emitted = ""
    with base.adapters_for_rows([adapter]):
        step_input = torch.tensor([prompt_ids], device=device)
        while True:
            out = base.model(input_ids=step_input, past_key_values=cache, use_cache=True, logits_to_keep=1)
            banned = sorted(stop_ids) if len(tokens) < params.min_tokens else None
            token = sampler(out.logits[0, -1], banned)
            if token in stop_ids:
                yield TextDelta("", token, "stop", eos=True)
                return
            tokens.append(token)
            text = base.tokenizer.decode(tokens, skip_special_tokens=True)
            finish = "length" if len(tokens) >= params.max_tokens else None
            stop_at = _first_stop(text, params.stop, len(emitted)) if params.stop else -1
            if stop_at >= 0:
                yield TextDelta(text[len(emitted):stop_at], token, "stop")
                return
            if text.endswith(REPLACEMENT_CHAR) and finish is None:
                yield TextDelta("", token, None)
            else:
                safe = _hold_back_stop_prefix(text, params.stop) if finish is None else len(text)
                yield TextDelta(text[len(emitted):safe], token, finish)
                emitted = text[:safe] if safe > len(emitted) else emitted
            if finish is not None:
                return
            step_input = torch.tensor([[token]], device=device)


def _first_stop(text: str, stops: tuple[str, ...], start: int) -> int:
    """Index where the earliest stop string begins (searching from a bit before `start`), else -1."""
    found = [i for s in stops if (i := text.find(s, max(0, start - len(s)))) >= 0]
    return min(found) if found else -1


def _hold_back_stop_prefix(text: str, stops: tuple[str, ...]) -> int:
    """Length of text safe to stream: a tail that could begin a stop string is held back."""
    hold = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:k]):
                hold = max(hold, k)
                break
    return len(text) - hold
