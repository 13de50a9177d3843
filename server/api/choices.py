"""The engine's deltas as OpenAI choices: text, finish reason, token counts, and logprobs in completions'
and chat's shapes (whole, or one streamed chunk's worth), and best_of's pick.

Logprobs are the engine's (log-softmax of the raw logits, server/engine/logprobs.py). A token's text is
`tokenizer.decode([id])` (what vLLM reports; a token holding part of a UTF-8 character shows U+FFFD) and
its `bytes` that text's UTF-8. A -inf logprob is reported as LOGPROB_FLOOR: JSON has no infinity.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Sequence

from server.engine.decode_state import TextDelta
from server.engine.logprobs import TokenLogprob

LOGPROB_FLOOR = -9999.0  # vLLM's stand-in for -inf


@dataclass
class ChoiceOutput:
    """One choice, as its deltas arrive."""

    index: int
    text: str = ""
    finish_reason: str | None = None
    completion_tokens: int = 0  # the eos step is not a completion token
    logprobs: list[TokenLogprob] = field(default_factory=list)  # of the completion tokens
    cumulative_logprob: float = 0.0  # of every sampled token, eos included (vLLM's best_of ranking)
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None

    def add(self, delta: TextDelta) -> None:
        self.text += delta.text
        if delta.finish_reason is not None:
            self.finish_reason = delta.finish_reason
        if delta.prompt_logprobs is not None:
            self.prompt_logprobs = delta.prompt_logprobs
        if delta.logprob is not None:
            self.cumulative_logprob += delta.logprob.logprob
            if not delta.eos:
                self.logprobs.append(delta.logprob)
        if not delta.eos:
            self.completion_tokens += 1


def collect(deltas: Sequence[TextDelta], n: int) -> list[ChoiceOutput]:
    choices = [ChoiceOutput(i) for i in range(n)]
    for delta in deltas:
        choices[delta.index].add(delta)
    for choice in choices:
        if choice.finish_reason is None:  # cut short (the client left): as if by length
            choice.finish_reason = "length"
    return choices


def best_of(choices: list[ChoiceOutput], n: int) -> list[ChoiceOutput]:
    """The n choices with the highest cumulative logprob, best first, renumbered 0..n-1 (vLLM's best_of)."""
    ranked = sorted(choices, key=lambda c: c.cumulative_logprob, reverse=True)[:n]
    for index, choice in enumerate(ranked):
        choice.index = index
    return ranked


def _finite(logprob: float) -> float:
    return logprob if math.isfinite(logprob) else LOGPROB_FLOOR


class LogprobFormat:
    """Logprob entries in OpenAI's shapes, with the token texts decoded once per token id."""

    def __init__(self, tokenizer) -> None:
        self.token_text = functools.lru_cache(maxsize=65536)(lambda token: tokenizer.decode([token]))

    def completion(self, entries: Sequence[TokenLogprob | None], tokens: Sequence[int], offset: int) -> dict:
        """Completions' parallel lists for `tokens` (None entries: the echoed prompt's first token), the
        first text_offset being `offset` (the length of the choice's text before these tokens)."""
        texts = [self.token_text(t) for t in tokens]
        offsets = []
        for text in texts:
            offsets.append(offset)
            offset += len(text)
        return {
            "tokens": texts,
            "token_logprobs": [None if e is None else _finite(e.logprob) for e in entries],
            "top_logprobs": [None if e is None else {self.token_text(t): _finite(lp) for t, lp in e.top}
                             for e in entries],
            "text_offset": offsets,
        }

    def chat(self, entries: Sequence[TokenLogprob]) -> dict:
        return {"content": [{**self._chat_entry(e.token, e.logprob),
                             "top_logprobs": [self._chat_entry(t, lp) for t, lp in e.top]} for e in entries]}

    def _chat_entry(self, token: int, logprob: float) -> dict:
        text = self.token_text(token)
        return {"token": text, "logprob": _finite(logprob), "bytes": list(text.encode("utf-8"))}

    def text_length(self, tokens: Sequence[int]) -> int:
        return sum(len(self.token_text(t)) for t in tokens)


def answer_choices(choices: list[ChoiceOutput], chat: bool, shown: LogprobFormat | None, echo: str | None,
                   prompt_ids: Sequence[int]) -> list[dict]:
    """The choices of a whole (non-streamed) answer; `shown`: None when no logprobs were asked for."""
    answers = []
    for c in choices:
        if chat:
            answers.append({"index": c.index, "message": {"role": "assistant", "content": c.text},
                            "finish_reason": c.finish_reason, "logprobs": shown and shown.chat(c.logprobs)})
            continue
        logprobs = None
        if shown is not None:
            prompt = prompt_ids if c.prompt_logprobs is not None else []
            logprobs = shown.completion([*(c.prompt_logprobs or ()), *c.logprobs],
                                        [*prompt, *(e.token for e in c.logprobs)], offset=0)
        answers.append({"index": c.index, "text": (echo or "") + c.text, "finish_reason": c.finish_reason,
                        "logprobs": logprobs})
    return answers


class StreamedLogprobs:
    """Per choice of a streamed answer: the logprobs not sent yet (a token whose text is held back sends
    its logprob with the choice's next chunk) and, for completions, the next token's text_offset."""

    def __init__(self, shown: LogprobFormat | None, chat: bool, n: int, prompt_ids: Sequence[int]) -> None:
        self.shown, self.chat, self.prompt_ids = shown, chat, prompt_ids
        self.pending: list[list[TokenLogprob]] = [[] for _ in range(n)]
        self.offsets = [0] * n

    def add(self, delta: TextDelta) -> None:
        if self.shown is not None and delta.logprob is not None and not delta.eos:
            self.pending[delta.index].append(delta.logprob)

    def take(self, index: int, prompt: tuple[TokenLogprob | None, ...] | None = None) -> dict | None:
        """The logprobs for choice `index`'s next chunk (with `prompt`'s first: an echoed prompt)."""
        entries, self.pending[index] = self.pending[index], []
        if self.shown is None:
            return None
        if self.chat:
            return self.shown.chat(entries)
        tokens = [*(self.prompt_ids if prompt is not None else ()), *(e.token for e in entries)]
        part = self.shown.completion([*(prompt or ()), *entries], tokens, self.offsets[index])
        self.offsets[index] += self.shown.text_length(tokens)
        return part
