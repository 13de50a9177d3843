"""Per-sequence decode bookkeeping shared by the single-request loop and the batched scheduler:
logprobs, logits processors, sampling, stop conditions (eos, stop strings, max_tokens, min_tokens) and
incremental detokenization. A request with `n > 1` has one DecodeState per choice.

    deltas = step_rows(states, logits)   # one step of B sequences; logits: [B, vocab], row i for states[i]
    delta = state.step(row_logits)       # the same for one sequence (B = 1)

Each step: the rows with logits processors or an EOS ban (min_tokens) get a processed copy of their logits,
then every row samples in one batched call (batch_sampling.py), then ONE device-to-host transfer brings
the sampled tokens back, with the logprobs (of the raw logits) of the rows that ask for them. Only then
do the processors hear their token (`accept`) and the text move on. Rows that ask for nothing of the kind
cost a share of the batched sampler and nothing more.

Text comes from an incremental detokenizer (detokenize.py: O(1) per token, equal to decoding the whole
sequence): its stable text, less a tail that could begin a stop string, is streamed; its pending text (a
partial character, a space the tokenizer's clean-up may delete) only counts for stop strings and at the end.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from transformers import PreTrainedTokenizerBase

from server.engine.batch_sampling import sample_rows
from server.engine.detokenize import REPLACEMENT_CHAR, make_detokenizer
from server.engine.host import upload
from server.engine.logits_processors import build_processors
from server.engine.logprobs import TokenLogprob
from server.engine.sampling import Sampler, SamplingParams

__all__ = ["REPLACEMENT_CHAR", "DecodeState", "TextDelta", "step_rows"]


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
        self.detokenizer = make_detokenizer(tokenizer)
        self.tokens: list[int] = []
        self.unsent = ""  # stable text not streamed yet: a tail that could begin a stop string
        self.sent_tail = ""  # the last streamed characters a stop string could still begin in (see accept)
        self.stop_reach = max((len(s) for s in params.stop), default=1) - 1
        self.finished = False
        self._banned_ids: torch.Tensor | None = None  # the stop ids on the device, while min_tokens bans them

    def step(self, logits: torch.Tensor) -> TextDelta:
        """logits: [vocab], raw, for this sequence's next position (never changed)."""
        return step_rows([self], logits[None])[0]

    def banned_ids(self, device: torch.device) -> torch.Tensor | None:
        """The token ids this step may not sample ([k] int64 on `device`), or None: EOS before min_tokens."""
        if not self.stop_ids or len(self.tokens) >= self.params.min_tokens:
            return None
        if self._banned_ids is None or self._banned_ids.device != device:
            self._banned_ids = upload(torch.tensor(sorted(self.stop_ids)), device)
        return self._banned_ids

    def accept(self, token: int, logprob: TokenLogprob | None = None) -> TextDelta:
        """The token sampled for this sequence (its processors already told) -> this step's delta."""
        if token in self.stop_ids:
            self.finished = True
            return TextDelta("", token, "stop", eos=True, index=self.choice, logprob=logprob)
        self.tokens.append(token)
        stable, pending = self.detokenizer.push(token)
        fresh = self.unsent + stable
        text = fresh + pending  # the whole decode past what was streamed
        finish = "length" if len(self.tokens) >= self.params.max_tokens else None
        # searched from a little before: a clean-up may delete a pending space and join new text to streamed
        stop_at = _first_stop(self.sent_tail + text, self.params.stop) if self.params.stop else -1
        if stop_at >= 0:
            self.finished = True
            return TextDelta(text[:max(0, stop_at - len(self.sent_tail))], token, "stop", index=self.choice,
                             logprob=logprob)
        if finish is not None:
            self.finished = True
            return TextDelta(text, token, finish, index=self.choice, logprob=logprob)
        if text.endswith(REPLACEMENT_CHAR):  # a partial character: wait for the next token, as before
            self.unsent = fresh
            return TextDelta("", token, None, index=self.choice, logprob=logprob)
        # held back: a tail of the stable text that could begin a stop string, whatever follows it (the
        # pending text may still change: a clean-up can delete its leading space)
        safe = _hold_back_stop_prefix(fresh, self.params.stop)
        self.unsent = fresh[safe:]
        if self.stop_reach:
            self.sent_tail = (self.sent_tail + fresh[:safe])[-self.stop_reach:]
        return TextDelta(fresh[:safe], token, None, index=self.choice, logprob=logprob)


def step_rows(states: Sequence[DecodeState], logits: torch.Tensor) -> list[TextDelta]:
    """One step for B unfinished sequences. logits: [B, vocab], raw, row i for states[i]; never changed
    (the choices of one request read the same prefill row). -> one delta per state, in order."""
    sampling = _processed(states, logits)
    tokens = sample_rows(sampling, [s.sampler for s in states])  # [B] int64, on the device
    asking = [i for i, s in enumerate(states) if s.params.logprobs is not None]
    host_tokens, logprobs = _to_host(tokens, logits, asking, [states[i].params.logprobs for i in asking])
    by_row = dict(zip(asking, logprobs))
    deltas = []
    for i, (state, token) in enumerate(zip(states, host_tokens)):
        for processor in state.processors:
            processor.accept(token)
        deltas.append(state.accept(token, by_row.get(i)))
    return deltas


def _processed(states: Sequence[DecodeState], logits: torch.Tensor) -> torch.Tensor:
    """The logits to sample from: `logits` itself when no row has processors or an EOS ban, else a float32
    copy with those rows processed (processors in order, then the ban)."""
    banned = [s.banned_ids(logits.device) for s in states]
    custom = [i for i, s in enumerate(states) if s.processors or banned[i] is not None]
    if not custom:
        return logits
    work = logits.to(torch.float32, copy=True)
    for i in custom:
        row = work[i]
        for processor in states[i].processors:
            row = processor(states[i].tokens, row)
        if row.data_ptr() != work[i].data_ptr():  # a processor returned a new tensor
            work[i].copy_(row)
        if banned[i] is not None:
            work[i].index_fill_(0, banned[i], float("-inf"))
    return work


def _to_host(tokens: torch.Tensor, logits: torch.Tensor, asking: list[int],
             tops: list[int]) -> tuple[list[int], list[TokenLogprob]]:
    """The step's one device-to-host transfer: the sampled tokens and, for the rows in `asking`, the
    sampled token's logprob and the `tops[j]` most likely (logprobs.sampled_logprob's values, batched).
    tokens: [B] int64; logits: [B, vocab] raw. Everything travels as float64 in one tensor: exact for
    float32 logprobs and for token ids below 2**53."""
    if not asking:
        return tokens.tolist(), []
    index = upload(torch.tensor(asking), logits.device)
    logprobs = torch.log_softmax(logits.index_select(0, index).float(), dim=-1)  # [L, vocab]
    chosen = logprobs.gather(1, tokens.index_select(0, index)[:, None])[:, 0]  # [L]
    parts = [tokens.double(), chosen.double()]
    for row, top in enumerate(tops):
        if top:
            values, ids = torch.topk(logprobs[row], min(top, logprobs.shape[-1]))
            parts += [values.double(), ids.double()]
    flat = torch.cat(parts).tolist()
    batch, at = len(tokens), len(tokens) + len(asking)
    host_tokens = [int(t) for t in flat[:batch]]
    entries = []
    for row, top in enumerate(tops):
        top = min(top, logprobs.shape[-1])
        values, ids = flat[at : at + top], flat[at + top : at + 2 * top]
        at += 2 * top
        entries.append(TokenLogprob(host_tokens[asking[row]], flat[batch + row],
                                    tuple(zip((int(i) for i in ids), values))))
    return host_tokens, entries


def _first_stop(text: str, stops: tuple[str, ...]) -> int:
    """Index where the earliest stop string begins in `text`, else -1."""
    found = [i for s in stops if (i := text.find(s)) >= 0]
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
