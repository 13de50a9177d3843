"""Per-request sampling settings: greedy, temperature, top-k, top-p, seed. Settings never leak between
requests; the sampling itself, batched over a step's rows, is batch_sampling.py.

`SamplingParams` also carries what the other per-row stages read: the logits processors' settings
(penalties, logit_bias: logits_processors.py), how many logprobs to report (logprobs.py) and `n`, the
sequences the scheduler samples from one prefill. Choice i of a seeded request draws from its own
generator, seeded with `choice_seed(seed, i)`: choice 0 uses the seed itself, so `n=1` and choice 0 of
`n>1` sample the same tokens.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import torch

from server.engine.batch_sampling import sample_rows

if TYPE_CHECKING:
    from server.engine.logits_processors import LogitsProcessor

# Temperatures below this sample greedily (vLLM's _SAMPLING_EPS): dividing logits by a tinier one
# overflows them to inf, and softmax of inf - inf is NaN, which torch.multinomial refuses.
GREEDY_BELOW_TEMPERATURE = 1e-5
SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed accepts
MAX_LOGPROBS = 20  # top alternatives per token, at most (vLLM's default max_logprobs)
PENALTY_RANGE = (-2.0, 2.0)  # OpenAI's presence_penalty / frequency_penalty
LOGIT_BIAS_RANGE = (-100.0, 100.0)  # OpenAI's


class ConstraintFactory(Protocol):
    """What a request's structured-output constraint is to the engine (grammar.CompiledGrammar): shared
    by the requests that ask for it; `processor()` makes a fresh, stateful one per sequence."""

    def processor(self) -> LogitsProcessor: ...


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
    n: int = 1  # sequences sampled from the one prefill of the prompt (the route asks for best_of of them)
    logprobs: int | None = None  # alternatives reported with each sampled token's logprob; None: none computed
    prompt_logprobs: int | None = None  # the same for each prompt token after the first (echo); None: none
    presence_penalty: float = 0.0  # OpenAI's: minus this once for a token generated at least once
    frequency_penalty: float = 0.0  # OpenAI's: minus this times the token's count in the generated text
    repetition_penalty: float = 1.0  # vLLM's: tokens of prompt or output: positive logits / it, negative * it
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit), sorted by token id
    # structured output (response_format): applied after the other processors; None: unconstrained
    constraint: ConstraintFactory | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, not {self.max_tokens}")
        if not 0.0 <= self.temperature < float("inf") or not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"temperature={self.temperature} / top_p={self.top_p} out of range")
        if self.seed is not None and not SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]:
            raise ValueError(f"seed={self.seed} is outside {SEED_RANGE}")
        if self.n < 1:
            raise ValueError(f"n must be at least 1, not {self.n}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= MAX_LOGPROBS:
                raise ValueError(f"{name}={value} is outside 0..{MAX_LOGPROBS}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not PENALTY_RANGE[0] <= getattr(self, name) <= PENALTY_RANGE[1]:
                raise ValueError(f"{name}={getattr(self, name)} is outside {PENALTY_RANGE}")
        if not 0.0 < self.repetition_penalty < float("inf"):
            raise ValueError(f"repetition_penalty={self.repetition_penalty} must be above 0")
        if any(token < 0 or not LOGIT_BIAS_RANGE[0] <= bias <= LOGIT_BIAS_RANGE[1] for token, bias in self.logit_bias):
            raise ValueError(f"logit_bias needs token ids >= 0 and biases in {LOGIT_BIAS_RANGE}")
        if self.constraint is not None and (self.min_tokens or self.ignore_eos):
            raise ValueError("a constrained output ends with EOS once complete: min_tokens and ignore_eos do not apply")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW_TEMPERATURE


def choice_seed(seed: int, choice: int) -> int:
    """The seed of choice `choice` of a request seeded with `seed`: the seed itself for choice 0, else 64
    bits of a hash of both (deterministic across runs and machines, unlike Python's `hash`)."""
    if choice == 0:
        return seed
    digest = hashlib.blake2b(f"{seed}/{choice}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


class Sampler:
    """One choice's sampling settings and random generator (None when greedy). The batched math is
    batch_sampling.sample_rows; calling a Sampler samples one row through it (a test and tool convenience)."""

    def __init__(self, params: SamplingParams, device: torch.device, choice: int = 0) -> None:
        self.params = params
        self.generator = None
        if not params.greedy:
            self.generator = torch.Generator(device=device)
            if params.seed is not None:
                self.generator.manual_seed(choice_seed(params.seed, choice))
            else:
                self.generator.seed()

    def __call__(self, logits: torch.Tensor, banned: list[int] | None = None) -> int:
        """logits: [vocab]; banned: token ids that may not be chosen now (eos before min_tokens)."""
        logits = logits.float()
        if banned:
            logits = logits.clone()
            logits[banned] = float("-inf")
        return int(sample_rows(logits[None], [self])[0])
