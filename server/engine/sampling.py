"""Per-request sampling: greedy, temperature, top-k, top-p, seed. Settings never leak between requests."""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Temperatures below this sample greedily (vLLM's _SAMPLING_EPS): dividing logits by a tinier one
# overflows them to inf, and softmax of inf - inf is NaN, which torch.multinomial refuses.
GREEDY_BELOW_TEMPERATURE = 1e-5
SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed accepts


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 0.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 means no top-k cut
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    min_tokens: int = 0

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, not {self.max_tokens}")
        if not 0.0 <= self.temperature < float("inf") or not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"temperature={self.temperature} / top_p={self.top_p} out of range")
        if self.seed is not None and not SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]:
            raise ValueError(f"seed={self.seed} is outside {SEED_RANGE}")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW_TEMPERATURE


class Sampler:
    """Chooses the next token from one row of logits; owns the request's random generator."""

    def __init__(self, params: SamplingParams, device: torch.device) -> None:
        self.params = params
        self.generator = None
        if not params.greedy:
            self.generator = torch.Generator(device=device)
            if params.seed is not None:
                self.generator.manual_seed(params.seed)
            else:
                self.generator.seed()

    def __call__(self, logits: torch.Tensor, banned: list[int] | None = None) -> int:
        # logits: [vocab] (float); banned: token ids that may not be chosen now (eos before min_tokens)
        logits = logits.float()
        if banned:
            logits = logits.clone()
            logits[banned] = float("-inf")
        if self.params.greedy:
            return int(torch.argmax(logits))
        logits = logits / self.params.temperature
        if self.params.top_k > 0:
            kth = torch.topk(logits, min(self.params.top_k, logits.shape[-1])).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        if self.params.top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            cumulative = torch.cumsum(sorted_probs, dim=-1)
            drop = cumulative - sorted_probs > self.params.top_p  # keep the smallest prefix reaching top_p
            sorted_probs = sorted_probs.masked_fill(drop, 0.0)
            probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
        return int(torch.multinomial(probs, 1, generator=self.generator))
