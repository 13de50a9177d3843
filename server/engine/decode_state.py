"""Per-request decode bookkeeping shared by the single-request loop and the batched scheduler:
sampling, stop conditions (eos, stop strings, max_tokens, min_tokens) and incremental detokenization."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from server.engine.sampling import Sampler, SamplingParams

REPLACEMENT_CHAR = "\ufffd"  # what a partial UTF-8 sequence decodes to; wait for the next token


@dataclass(frozen=True)
class TextDelta:
    """What one step adds to the visible completion text (may be empty while a character is partial)."""

    text: str
    token_id: int
    finish_reason: str | None  # None while running, then "stop" or "length"
    eos: bool = False  # the step sampled end-of-sequence: it ends the request, it is not completion text


class DecodeState:
    """One request's generated tokens and emitted text. `step(logits)` samples, then reports the delta."""

    def __init__(self, params: SamplingParams, tokenizer: PreTrainedTokenizerBase, eos_ids: set[int],
                 device: torch.device) -> None:
        self.params = params
        self.tokenizer = tokenizer
        self.stop_ids = set() if params.ignore_eos else eos_ids
        self.sampler = Sampler(params, device)
        self.tokens: list[int] = []
        self.emitted = ""
        self.finished = False

    def step(self, logits: torch.Tensor) -> TextDelta:
        """logits: [vocab] for this request's next position."""
        banned = sorted(self.stop_ids) if len(self.tokens) < self.params.min_tokens else None
        return self.accept(self.sampler(logits, banned))

    def accept(self, token: int) -> TextDelta:
        if token in self.stop_ids:
            self.finished = True
            return TextDelta("", token, "stop", eos=True)
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        finish = "length" if len(self.tokens) >= self.params.max_tokens else None
        stop_at = _first_stop(text, self.params.stop, len(self.emitted)) if self.params.stop else -1
        if stop_at >= 0:
            self.finished = True
            return TextDelta(text[len(self.emitted):stop_at], token, "stop")
        if finish is None and text.endswith(REPLACEMENT_CHAR):
            return TextDelta("", token, None)
        safe = len(text) if finish is not None else _hold_back_stop_prefix(text, self.params.stop)
        delta = TextDelta(text[len(self.emitted):safe], token, finish)
        self.emitted = text[:safe] if safe > len(self.emitted) else self.emitted
        self.finished = finish is not None
        return delta


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
