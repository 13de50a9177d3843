"""Batched sampling: one step's rows choose their next tokens in one pass over [B, vocab] on the device.

    tokens = sample_rows(logits, samplers)    # logits: [B, vocab]; samplers: B sampling.Sampler -> [B] int64

What each row gets, by its own settings:
- greedy (temperature below GREEDY_BELOW_TEMPERATURE): argmax of its logits;
- sampled: logits / temperature; top_k keeps the k largest (ties with the k-th kept); softmax; top_p keeps
  the smallest prefix of the probabilities sorted high to low whose sum reaches top_p (the rest set to 0);
  then the exponential race: token = argmax(probs / E), E ~ Exp(1) drawn per vocabulary entry, which picks
  token i with probability probs_i / sum(probs) (the Gumbel-max trick, in exponential form; vLLM's
  sampler does the same). Each row's E comes from its own torch.Generator (seeded rows: from the seed, see
  sampling.choice_seed), so a row draws the same tokens whatever its neighbours are, and a row alone
  (B = 1: DecodeState.step, generate.py) draws the same as inside a batch.

The per-row work left is one `uniform_` per sampled row (its generator); softmax, top-k, top-p and the
argmaxes run once over the rows that need them. Nothing here waits for the device: the settings go up with
non-blocking copies and the result stays on the device for the caller's one transfer per step.

`reference_probs` is the slow reference: the filtered distribution of one row, as the per-row Sampler
computed it before it drew with torch.multinomial.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import torch

from server.engine.host import upload

if TYPE_CHECKING:
    from server.engine.sampling import Sampler, SamplingParams

TOP_P_CANDIDATES = 1024  # CPU: the largest entries top-p looks at before it sorts a whole row (see _top_p)
# the candidates' sum must clear top_p by this much: float rounding of the reference's (cumsum - p) is ~1e-7
COVERED_MARGIN = 1e-5


def sample_rows(logits: torch.Tensor, samplers: Sequence[Sampler]) -> torch.Tensor:
    """logits: [B, vocab], any float dtype, not changed (choices of one request share a prefill row);
    samplers: one per row, in order. -> [B] int64, on the logits' device."""
    logits = logits.float()
    drawn = [i for i, s in enumerate(samplers) if not s.params.greedy]
    if len(drawn) < len(samplers):
        tokens = logits.argmax(dim=-1)  # cheap for every row; the sampled rows' are overwritten below
        if not drawn:
            return tokens
    index = None if len(drawn) == len(samplers) else _upload(drawn, torch.long, logits.device)
    rows = logits if index is None else logits.index_select(0, index)  # [S, vocab]
    probs = filtered_probs(rows, [samplers[i].params for i in drawn])
    uniform = torch.empty_like(probs)
    for row, i in enumerate(drawn):
        uniform[row].uniform_(generator=samplers[i].generator)
    # E = -log(U) ~ Exp(1), U in [0, 1): E > 0 (U = 0 gives E = inf: that entry scores 0 this time).
    # uniform_ + log is ~5x cheaper than exponential_ on the CPU.
    picked = probs.div_(uniform.log_().neg_()).argmax(dim=-1)  # [S]
    return picked if index is None else tokens.index_copy_(0, index, picked)


def filtered_probs(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """logits: [S, vocab] float32 of sampled rows; params: each row's settings. -> [S, vocab] probabilities
    after temperature, top-k and top-p (unnormalized after top-p: the race does not need a sum of 1)."""
    device, vocab = logits.device, logits.shape[-1]
    scaled = logits / _upload([p.temperature for p in params], torch.float32, device)[:, None]
    top_k = [p.top_k if 0 < p.top_k < vocab else 0 for p in params]  # 0: no cut (a k >= vocab cuts nothing)
    if any(top_k):
        k = max(top_k)
        largest = torch.topk(scaled, k, dim=-1).values  # [S, k], high to low
        ks = _upload([max(k_row, 1) - 1 for k_row in top_k], torch.long, device)
        kth = largest.gather(1, ks[:, None])  # [S, 1]: each row's own k-th largest
        kth = kth.masked_fill(_upload([k_row == 0 for k_row in top_k], torch.bool, device)[:, None], float("-inf"))
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    cut = [row for row, p in enumerate(params) if p.top_p < 1.0]
    if cut:
        index = None if len(cut) == len(params) else _upload(cut, torch.long, device)
        part = probs if index is None else probs.index_select(0, index)
        part = _top_p(part, _upload([params[row].top_p for row in cut], torch.float32, device)[:, None])
        probs = part if index is None else probs.index_copy_(0, index, part)
    return probs


def _top_p(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """probs: [P, vocab]; top_p: [P, 1]. -> probs with all but the smallest prefix of the sorted
    probabilities reaching top_p set to 0 (the mass above an entry > top_p: dropped).

    On the CPU a full sort of a large vocabulary costs ~4.5 ms a row (49k entries, 2 cores), so the rows
    whose TOP_P_CANDIDATES largest entries already hold more than top_p (nearly every row of a real
    model's distribution) take those from one topk instead: the sorted prefix and its sums are the same
    and every later entry is dropped. The rest sort. On an accelerator the sort is one fast kernel and the
    per-row check would wait for the device, so every row sorts."""
    if probs.device.type == "cpu" and probs.shape[-1] > TOP_P_CANDIDATES:
        values, order = torch.topk(probs, TOP_P_CANDIDATES, dim=-1)  # [P, C], high to low
        cumulative = torch.cumsum(values, dim=-1)
        covered = (cumulative[:, -1:] > top_p + COVERED_MARGIN)[:, 0].tolist()
        if all(covered):
            kept = values.masked_fill(cumulative - values > top_p, 0.0)
            return torch.zeros_like(probs).scatter_(1, order, kept)
        if any(covered):
            rows = torch.tensor(covered)
            out = torch.empty_like(probs)
            out[rows] = _top_p(probs[rows], top_p[rows])
            out[~rows] = _top_p_sorted(probs[~rows], top_p[~rows])
            return out
    return _top_p_sorted(probs, top_p)


def _top_p_sorted(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """_top_p by a full sort of each row."""
    sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
    before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs  # mass above each entry
    sorted_probs = sorted_probs.masked_fill(before > top_p, 0.0)  # keep the smallest prefix reaching top_p
    return torch.zeros_like(probs).scatter_(1, order, sorted_probs)


def reference_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The per-row reference (the Sampler before batching): logits [vocab] -> probabilities [vocab]."""
    logits = logits.float() / params.temperature
    if params.top_k > 0:
        kth = torch.topk(logits, min(params.top_k, logits.shape[-1])).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        cumulative = torch.cumsum(sorted_probs, dim=-1)
        drop = cumulative - sorted_probs > params.top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
    return probs


def _upload(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small host list as a tensor on `device` without waiting for the device (host.upload)."""
    return upload(torch.tensor(values, dtype=dtype), device)
