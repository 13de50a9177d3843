"""The batched sampler against the per-row reference: greedy rows are argmax, the top-k / top-p filtered
distributions equal the old per-row Sampler's, draws follow those distributions, and a seeded row draws the
same tokens whatever its neighbours; step_rows equals each state stepped alone, and its one transfer
carries the same logprobs as logprobs.sampled_logprob."""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest
import torch
from transformers import AutoTokenizer

from server.engine.batch_sampling import TOP_P_CANDIDATES, filtered_probs, reference_probs, sample_rows
from server.engine.decode_state import DecodeState, step_rows
from server.engine.logprobs import sampled_logprob
from server.engine.sampling import Sampler, SamplingParams

CPU = torch.device("cpu")
VOCAB = 50
Z_FOR_1E5 = 4.265  # standard normal quantile for p = 1e-5: a fixed-seed chi-square test that is not fragile

SETTINGS = [  # sampled rows' settings, mixed within one batch
    {"temperature": 1.0},
    {"temperature": 0.7, "top_k": 5},
    {"temperature": 1.3, "top_p": 0.8},
    {"temperature": 0.9, "top_k": 12, "top_p": 0.6},
    {"temperature": 2.0, "top_k": 1},
    {"temperature": 1.0, "top_p": 1e-6},
    {"temperature": 1.0, "top_k": VOCAB + 5},  # k beyond the vocabulary cuts nothing
]


def params(**settings) -> SamplingParams:
    return SamplingParams(max_tokens=4, **settings)


def samplers_for(settings: list[dict], seed: int = 0) -> list[Sampler]:
    return [Sampler(params(seed=seed + i, **s), CPU) for i, s in enumerate(settings)]


def test_greedy_rows_are_argmax_and_logits_are_not_changed():
    logits = torch.randn(6, VOCAB) * 3
    before = logits.clone()
    rows = [Sampler(params(), CPU) if i % 2 else Sampler(params(temperature=1.0, seed=i), CPU) for i in range(6)]
    tokens = sample_rows(logits, rows)
    assert torch.equal(logits, before)
    for i in range(1, 6, 2):
        assert int(tokens[i]) == int(torch.argmax(logits[i]))  # the old Sampler's greedy: argmax
    bf16 = logits.to(torch.bfloat16)
    assert sample_rows(bf16, [Sampler(params(), CPU)] * 6).tolist() == bf16.float().argmax(-1).tolist()


def test_filtered_probabilities_equal_the_per_row_reference():
    torch.manual_seed(0)
    for trial in range(20):
        logits = torch.randn(len(SETTINGS), VOCAB) * (1 + trial % 4)
        logits[0, :3] = logits[0, 3]  # ties at the k-th value stay (masked_fill(logits < kth))
        batched = filtered_probs(logits, [params(**s) for s in SETTINGS])
        for row, settings in enumerate(SETTINGS):
            expected = reference_probs(logits[row], params(**settings))
            assert torch.equal(batched[row] > 0, expected > 0), (trial, settings)  # the same mask, exactly
            torch.testing.assert_close(batched[row], expected, atol=1e-7, rtol=1e-6)


def test_top_p_over_a_large_vocabulary_equals_the_reference():
    """Beyond TOP_P_CANDIDATES entries the CPU takes top-p from one topk where it can (peaked rows) and
    sorts the rest (flat rows): both, in one batch, against the per-row reference's full sort."""
    vocab = 3 * TOP_P_CANDIDATES
    torch.manual_seed(3)
    for trial in range(10):
        peaked = torch.randn(4, vocab) * 4  # the top entries hold most of the mass
        flat = torch.randn(3, vocab) * 0.3  # top_p needs more than the candidates
        logits = torch.cat([peaked, flat])[torch.randperm(7)]
        settings = [{"temperature": 0.5 + 0.2 * i, "top_p": 0.5 + 0.07 * i, "top_k": 0 if i % 3 else 2000}
                    for i in range(7)]
        batched = filtered_probs(logits, [params(**s) for s in settings])
        for row, setting in enumerate(settings):
            expected = reference_probs(logits[row], params(**setting))
            assert torch.equal(batched[row] > 0, expected > 0), (trial, row)
            torch.testing.assert_close(batched[row], expected, atol=1e-7, rtol=1e-6)


def _chi_square_bound(df: int) -> float:
    """The chi-square quantile for p = 1e-5 (Wilson-Hilferty)."""
    return df * (1 - 2 / (9 * df) + Z_FOR_1E5 * math.sqrt(2 / (9 * df))) ** 3


@pytest.mark.parametrize("settings", SETTINGS[:4], ids=["plain", "top-k", "top-p", "top-k-top-p"])
def test_draws_follow_the_filtered_distribution(settings):
    """20,000 draws over a small vocabulary: counts against the exact filtered probabilities."""
    vocab, rows, steps = 8, 500, 40
    logits = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0])
    expected = reference_probs(logits, params(**settings))
    expected = expected / expected.sum()
    sampler = Sampler(params(seed=1234, **settings), CPU)  # one generator: successive draws are independent
    counts = Counter()
    for _ in range(steps):
        counts.update(sample_rows(logits.expand(rows, vocab), [sampler] * rows).tolist())
    draws = rows * steps
    support = [t for t in range(vocab) if expected[t] > 0]
    assert set(counts) <= set(support)  # filtered-out tokens are never drawn
    chi2 = sum((counts[t] - draws * float(expected[t])) ** 2 / (draws * float(expected[t])) for t in support)
    assert chi2 < _chi_square_bound(len(support) - 1), (chi2, counts, expected)


def test_top_k_one_and_tiny_top_p_draw_the_argmax():
    logits = torch.randn(4, VOCAB)
    rows = samplers_for([{"temperature": 1.0, "top_k": 1}, {"temperature": 1.0, "top_p": 1e-6}] * 2)
    for _ in range(20):
        assert sample_rows(logits, rows).tolist() == logits.argmax(-1).tolist()


def test_a_seeded_row_draws_the_same_whatever_its_neighbours():
    rng = random.Random(0)
    steps = [torch.randn(VOCAB) * 2 for _ in range(12)]
    mine = {"temperature": 1.1, "top_k": 20, "top_p": 0.9, "seed": 77}
    alone_sampler = Sampler(params(**mine), CPU)
    alone = [int(sample_rows(row[None], [alone_sampler])[0]) for row in steps]
    assert len(set(alone)) > 1  # it does sample
    for trial in range(4):
        me = Sampler(params(**mine), CPU)
        neighbours = samplers_for(SETTINGS, seed=100 * trial) + [Sampler(params(), CPU),  # greedy
                                                                 Sampler(params(temperature=1.0), CPU)]  # unseeded
        drawn = []
        for row in steps:
            batch = rng.sample(neighbours, rng.randrange(len(neighbours)))
            at = rng.randrange(len(batch) + 1)
            batch.insert(at, me)
            logits = torch.randn(len(batch), VOCAB) * 3
            logits[at] = row
            drawn.append(int(sample_rows(logits, batch)[at]))
        assert drawn == alone, trial


def test_seeds_reproduce_and_differ():
    logits = torch.randn(VOCAB)

    def draws(seed):
        sampler = Sampler(params(temperature=1.0, seed=seed), CPU)
        return [int(sample_rows(logits[None], [sampler])[0]) for _ in range(30)]

    assert draws(5) == draws(5) != draws(6)


@pytest.fixture(scope="module")
def tokenizer(tiny_llama_dir):
    return AutoTokenizer.from_pretrained(tiny_llama_dir)


STATE_SETTINGS = [  # step_rows rows: the plain batched path beside the rows with processors, logprobs, bans
    {},
    {"temperature": 0.8, "seed": 3},
    {"temperature": 1.2, "top_p": 0.9, "seed": 4, "logprobs": 3},
    {"presence_penalty": 1.5, "logit_bias": ((5, 4.0),), "logprobs": 0},
    {"temperature": 1.0, "seed": 5, "min_tokens": 4, "repetition_penalty": 1.3},
    {"min_tokens": 6, "logprobs": 2},
    {"temperature": 0.9, "top_k": 8, "seed": 6, "frequency_penalty": -0.5},
]


def _states(tokenizer, eos: int) -> list[DecodeState]:
    return [DecodeState(SamplingParams(max_tokens=10, **s), tokenizer, {eos}, CPU, prompt_ids=[7, 8, 9])
            for s in STATE_SETTINGS]


def test_step_rows_equals_each_state_stepped_alone(tokenizer):
    eos = tokenizer.eos_token_id
    vocab = len(tokenizer)
    torch.manual_seed(1)
    steps = []
    for _ in range(8):
        logits = torch.randn(len(STATE_SETTINGS), vocab) * 2
        logits[:, eos] += 10.0  # EOS is likely: min_tokens bans it, the others may stop
        steps.append(logits)
    together, alone = _states(tokenizer, eos), _states(tokenizer, eos)
    for logits in steps:
        live = [i for i, s in enumerate(together) if not s.finished]
        if not live:
            break
        lengths = [len(together[i].tokens) for i in live]
        batched = step_rows([together[i] for i in live], logits[live])
        for i, length, delta in zip(live, lengths, batched):
            assert delta == alone[i].step(logits[i])
            if STATE_SETTINGS[i].get("min_tokens", 0) > length:
                assert not delta.eos
            if "logprobs" in STATE_SETTINGS[i]:
                expected = sampled_logprob(logits[i], delta.token_id, STATE_SETTINGS[i]["logprobs"])
                assert delta.logprob == expected  # exactly: the same float32 values, the same top ids
    assert any(s.finished for s in together) and not all(s.finished for s in together)


def test_step_rows_does_not_change_shared_logits(tokenizer):
    """n > 1 choices sample from copies of one prefill row: processors and bans work on a copy."""
    eos = tokenizer.eos_token_id
    logits = torch.randn(len(STATE_SETTINGS), len(tokenizer))
    before = logits.clone()
    step_rows(_states(tokenizer, eos), logits)
    assert torch.equal(logits, before)
