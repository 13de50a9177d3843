"""Per-row logit changes applied before sampling: logit_bias, the penalties and the structured-output
grammar (server/engine/grammar.py, last).

One interface for every processor (the grammar module writes its own against it):

    processor(generated, logits) -> logits   logits: [vocab] float32 of one row; may change it in place
    processor.accept(token)                  the token sampled from it (a no-op for stateless processors)

`DecodeState` builds a request's processors once (`build_processors`), calls them in order on each step's
logits and tells them the token it sampled. The order is vLLM V1's: logit_bias, then repetition_penalty,
then frequency and presence penalties; the sampler applies temperature, top-k and top-p after them.
Logprobs are taken from the raw logits, before any of them. A request that asks for none of them gets an
empty list, so the plain path does no extra work per token.
"""

from __future__ import annotations

from typing import Protocol, Sequence

import torch

from server.engine.sampling import SamplingParams


class LogitsProcessor(Protocol):
    def __call__(self, generated: Sequence[int], logits: torch.Tensor) -> torch.Tensor:
        """generated: this row's sampled tokens so far; logits: [vocab] float32, may be changed in place."""
        ...

    def accept(self, token: int) -> None:
        """Told the token sampled after this step's call."""
        ...


class LogitBias:
    """OpenAI's logit_bias: a fixed amount added to the logits of the named token ids (stateless)."""

    def __init__(self, bias: tuple[tuple[int, float], ...]) -> None:
        self.bias = bias
        self._on: tuple[torch.device, torch.Tensor, torch.Tensor] | None = None  # ids, values on a device

    def __call__(self, generated: Sequence[int], logits: torch.Tensor) -> torch.Tensor:
        if self._on is None or self._on[0] != logits.device:
            ids = torch.tensor([t for t, _ in self.bias], dtype=torch.long, device=logits.device)
            values = torch.tensor([b for _, b in self.bias], dtype=logits.dtype, device=logits.device)
            self._on = (logits.device, ids, values)
        _, ids, values = self._on
        return logits.index_add_(0, ids, values)

    def accept(self, token: int) -> None:
        pass


class Penalties:
    """OpenAI's presence and frequency penalties (over the generated tokens) and vLLM's repetition penalty
    (over prompt and generated tokens), per vLLM's formulas:

        seen (prompt or output):  logit / repetition if logit > 0 else logit * repetition
        then                      logit -= frequency * count + presence * (count > 0)   (count: in the output)

    The counts live on the logits' device, built on the first call from `generated` and kept up to date
    by `accept`, so a step costs a few vocab-wide elementwise ops and no host-to-device copy."""

    def __init__(self, presence: float, frequency: float, repetition: float, prompt_ids: Sequence[int]) -> None:
        self.presence, self.frequency, self.repetition = presence, frequency, repetition
        self.prompt_ids = list(prompt_ids)
        self._counts: torch.Tensor | None = None  # [vocab] float32: times each token was generated
        self._seen: torch.Tensor | None = None  # [vocab] bool: in the prompt or generated

    def __call__(self, generated: Sequence[int], logits: torch.Tensor) -> torch.Tensor:
        if self._counts is None:
            self._counts = torch.zeros_like(logits)
            if generated:
                self._counts.index_add_(0, torch.tensor(list(generated), device=logits.device),
                                        torch.ones(len(generated), dtype=logits.dtype, device=logits.device))
            self._seen = self._counts > 0
            if self.prompt_ids:
                self._seen[torch.tensor(self.prompt_ids, device=logits.device)] = True
        if self.repetition != 1.0:
            penalized = torch.where(logits > 0, logits / self.repetition, logits * self.repetition)
            logits = torch.where(self._seen, penalized, logits)
        if self.frequency:
            logits = logits.sub_(self._counts, alpha=self.frequency)
        if self.presence:
            logits = logits.sub_((self._counts > 0).to(logits.dtype), alpha=self.presence)
        return logits

    def accept(self, token: int) -> None:
        if self._counts is not None:
            self._counts[token] += 1
            self._seen[token] = True


def build_processors(params: SamplingParams, prompt_ids: Sequence[int], tokenizer) -> list[LogitsProcessor]:
    """The processors `params` asks for, in the order they apply (none: an empty list). `tokenizer` is for
    processors that read token text (the grammar's); these do not."""
    processors: list[LogitsProcessor] = []
    if params.logit_bias:
        processors.append(LogitBias(params.logit_bias))
    if params.presence_penalty or params.frequency_penalty or params.repetition_penalty != 1.0:
        processors.append(Penalties(params.presence_penalty, params.frequency_penalty, params.repetition_penalty,
                                    prompt_ids))
    if params.constraint is not None:  # last: its -inf mask stays -inf through the others
        processors.append(params.constraint.processor())
    return processors
