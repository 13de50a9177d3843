"""Logprobs as reported to clients: log-softmax of the model's raw logits.

Raw means before logit_bias, penalties, temperature, top-k and top-p (what vLLM V1 returns by default):
the model's own distribution at that position, whatever the request's sampling settings. A sampled
token's entry holds its own logprob and the `top` most likely tokens (OpenAI's top_logprobs: the top k
only, the sampled token among them only if it is one of them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass(frozen=True)
class TokenLogprob:
    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token id, logprob), most likely first


def sampled_logprob(logits: torch.Tensor, token: int, top: int) -> TokenLogprob:
    """logits: [vocab], raw. One log_softmax and one topk."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    if not top:
        return TokenLogprob(token, float(logprobs[token]))
    values, ids = torch.topk(logprobs, min(top, logprobs.shape[-1]))
    values = torch.cat([logprobs[token : token + 1], values]).tolist()
    return TokenLogprob(token, values[0], tuple(zip(ids.tolist(), values[1:])))


def prompt_logprobs(logits: torch.Tensor, prompt_ids: Sequence[int], top: int) -> tuple[TokenLogprob | None, ...]:
    """logits: [P - 1, vocab], raw, row j at the position of prompt token j (so predicting token j + 1).
    -> one entry per prompt token; the first is None (nothing predicts it)."""
    if len(prompt_ids) < 2:
        return (None,) * len(prompt_ids)
    logprobs = torch.log_softmax(logits.float(), dim=-1)  # [P - 1, vocab]
    targets = torch.tensor(prompt_ids[1:], device=logprobs.device)
    chosen = logprobs.gather(1, targets[:, None]).squeeze(1).tolist()
    if top:
        values, ids = torch.topk(logprobs, min(top, logprobs.shape[-1]), dim=-1)
        tops = [tuple(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]
    else:
        tops = [()] * len(chosen)
    return (None, *(TokenLogprob(t, lp, tp) for t, lp, tp in zip(prompt_ids[1:], chosen, tops)))
