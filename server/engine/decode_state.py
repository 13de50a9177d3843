"""Per-sequence decode bookkeeping shared by the single-request loop and the batched scheduler:
logprobs, logits processors, sampling, stop conditions (eos, stop strings, max_tokens, min_tokens) and
incremental detokenization. A request with `n > 1` has one DecodeState per choice.

Each step: logprobs from the raw logits (only when asked), then the processors on a copy (only when the
request has any), then the sampler. The plain path (no logprobs, no processors) does nothing more than
sample.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from transformers import PreTrainedTokenizerBase

from server.engine.logits_processors import build_processors
from server.engine.logprobs import TokenLogprob, sampled_logprob
from server.engine.sampling import Sampler, SamplingParams

REPLACEMENT_CHAR = "\ufffd"  # what a partial UTF-8 sequence decodes to; wait for the next token


@dataclass(frozen=True)
class TextDelta:
    """What one step adds to the visible completion text (may be empty while a character is partial)."""

    text: str
    token_id: int
    finish_reason: str | None  # None while running, then "stop" or "length"
    eos: bool = False  # the step sampled end-of-sequence: it ends the request, it is not completion text
    index: int = 0  # which of the request's `n` choices this delta belongs to
    logprob: TokenLogprob | None = None  # of this step's token (eos too), when the request asks for logprobs
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None  # on a choice's first delta, when asked


class DecodeState:
    """One sequence's generated tokens and emitted text. `step(logits)` samples, then reports the delta."""

    def __init__(self, params: SamplingParams, tokenizer: PreTrainedTokenizerBase, eos_ids: set[int],
                 device: torch.device, prompt_ids: Sequence[int] = (), choice: int = 0) -> None:
        """`prompt_ids`: what repetition_penalty counts besides the output; `choice`: which of the
        request's n sequences this is (it picks the seed, see sampling.choice_seed)."""
        self.params = params
        self.tokenizer = tokenizer
        self.choice = choice
        self.stop_ids = set() if params.ignore_eos else eos_ids
        self.sampler = Sampler(params, device, choice)
        self.processors = build_processors(params, prompt_ids, tokenizer)
        self.tokens: list[int] = []
        self.emitted = ""
        self.finished = False

    def step(self, logits: torch.Tensor) -> TextDelta:
        """logits: [vocab], raw, for this sequence's next position (never changed: choices of one request
        read the same row at their first step)."""
        banned = sorted(self.stop_ids) if len(self.tokens) < self.params.min_tokens else None
        raw = logits
        if self.processors:
            logits = logits.clone() if logits.dtype == torch.float32 else logits.float()  # a copy either way
            for processor in self.processors:
                logits = processor(self.tokens, logits)
        token = self.sampler(logits, banned)
        for processor in self.processors:
            processor.accept(token)
        logprob = None if self.params.logprobs is None else sampled_logprob(raw, token, self.params.logprobs)
        return self.accept(token, logprob)

    def accept(self, token: int, logprob: TokenLogprob | None = None) -> TextDelta:
        if token in self.stop_ids:
            self.finished = True
            return TextDelta("", token, "stop", eos=True, index=self.choice, logprob=logprob)
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        finish = "length" if len(self.tokens) >= self.params.max_tokens else None
        stop_at = _first_stop(text, self.params.stop, len(self.emitted)) if self.params.stop else -1
        if stop_at >= 0:
            self.finished = True
            return TextDelta(text[len(self.emitted):stop_at], token, "stop", index=self.choice, logprob=logprob)
        if finish is None and text.endswith(REPLACEMENT_CHAR):
            return TextDelta("", token, None, index=self.choice, logprob=logprob)
        safe = len(text) if finish is not None else _hold_back_stop_prefix(text, self.params.stop)
        delta = TextDelta(text[len(self.emitted):safe], token, finish, index=self.choice, logprob=logprob)
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
