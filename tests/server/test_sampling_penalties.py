"""Penalties and logit_bias: the processors against a slow loop over the formulas, and served per row in a
mixed batch, each row equal to the same request run alone and to a slow reference decode."""

from __future__ import annotations

import random
import threading
from collections import Counter

import pytest
import torch

from adapters import read_adapter_folder
from server.engine.loaded import load_adapter
from server.engine.logits_processors import LogitBias, Penalties, build_processors
from server.engine.sampling import SamplingParams
from server.engine.scheduler import GenerationRequest, Scheduler, SchedulerLimits
from tests.server.conftest import CPU_FP32, WAIT_S

MODEL_LOCK = threading.Lock()  # the scheduler thread and the reference forwards share one model
PROMPTS = ["Once upon a time", "The capital of France is", "def fibonacci(n):", "I like to eat", "Hello!"]
NEW_TOKENS = 8


def reference_processed(logits: list[float], prompt: list[int], generated: list[int],
                        params: SamplingParams) -> list[float]:
    """The formulas, one token at a time: logit_bias, then vLLM's repetition penalty over prompt and
    output, then OpenAI's frequency and presence penalties over the output."""
    out = list(logits)
    for token, bias in params.logit_bias:
        out[token] += bias
    counts, seen = Counter(generated), set(prompt) | set(generated)
    r = params.repetition_penalty
    for token, value in enumerate(out):
        if token in seen and r != 1.0:
            value = value / r if value > 0 else value * r
        value -= params.frequency_penalty * counts[token]
        if counts[token]:
            value -= params.presence_penalty
        out[token] = value
    return out


def _apply(processors, generated, logits):
    for processor in processors:
        logits = processor(generated, logits)
    return logits


@pytest.mark.parametrize("settings", [
    {"presence_penalty": 0.7}, {"frequency_penalty": -1.3}, {"repetition_penalty": 1.8},
    {"repetition_penalty": 0.6, "presence_penalty": -0.5, "frequency_penalty": 2.0},
    {"logit_bias": ((3, 100.0), (7, -100.0), (11, 0.25))},
    {"logit_bias": ((5, 2.0),), "repetition_penalty": 1.3, "frequency_penalty": 0.4},
])
def test_processors_equal_the_formulas_step_by_step(settings):
    """Incremental state (counts kept by accept) must match the formula over the whole history."""
    rng = random.Random(0)
    vocab = 40
    params = SamplingParams(max_tokens=8, **settings)
    prompt = [rng.randrange(vocab) for _ in range(6)]
    processors = build_processors(params, prompt, tokenizer=None)
    generated: list[int] = []
    for _ in range(8):
        logits = torch.randn(vocab) * 3
        expected = reference_processed(logits.tolist(), prompt, generated, params)
        got = _apply(processors, generated, logits.clone())
        torch.testing.assert_close(got, torch.tensor(expected), atol=1e-5, rtol=1e-5)
        token = rng.randrange(vocab) if rng.random() < 0.5 else rng.choice(prompt + generated + [0])
        for processor in processors:
            processor.accept(token)
        generated.append(token)


def test_no_settings_build_no_processors():
    assert build_processors(SamplingParams(max_tokens=1), [1, 2], tokenizer=None) == []
    kinds = [type(p) for p in build_processors(
        SamplingParams(max_tokens=1, logit_bias=((1, 1.0),), presence_penalty=0.1), [1], tokenizer=None)]
    assert kinds == [LogitBias, Penalties]


# -- in the scheduler: per row, in mixed batches -------------------------------------------------------------

@pytest.fixture(scope="module")
def loaded(tiny_adapters):
    return {name: load_adapter(name, 1, read_adapter_folder(path), CPU_FP32.device, CPU_FP32.dtype)
            for name, path in tiny_adapters.items()}


class Choices:
    """Collects one request's deltas, all choices, until each has finished (or an error came)."""

    def __init__(self, n: int = 1) -> None:
        self.n, self.deltas, self.errors = n, [], []
        self.done = threading.Event()

    def __call__(self, item) -> None:
        if isinstance(item, BaseException):
            self.errors.append(item)
            self.done.set()
            return
        self.deltas.append(item)
        if sum(d.finish_reason is not None for d in self.deltas) == self.n:
            self.done.set()

    def tokens(self, choice: int = 0) -> list[int]:
        assert self.done.wait(WAIT_S), "request did not finish"
        assert not self.errors, self.errors
        return [d.token_id for d in self.deltas if d.index == choice]


def run_batch(base, jobs, max_running: int = 8, steps: list | None = None) -> list[Choices]:
    """Submit every (prompt ids, params, adapter) before the scheduler starts, so they are admitted together
    (one prefill, then shared decode steps); -> each one's collector."""
    on_step = (lambda phase, size, _: steps.append((phase, size))) if steps is not None else None
    sched = Scheduler(base, SchedulerLimits(max_running=max_running, max_waiting=16, max_len=128), MODEL_LOCK,
                      on_step=on_step)
    collectors = []
    for ids, params, adapter in jobs:
        collectors.append(Choices(params.n))
        sched.submit(GenerationRequest(list(ids), params, adapter, emit=collectors[-1]))
    sched.start()
    try:
        for collector in collectors:
            assert collector.done.wait(WAIT_S)
    finally:
        sched.stop()
    return collectors


def full_forward_logits(base, ids: list[int], adapter) -> torch.Tensor:
    """The slow reference: the whole sequence through the base's own HF forward, no cache. -> [S, vocab]"""
    with MODEL_LOCK, torch.inference_mode(), base.adapters_for_rows([adapter]):
        return base.model(input_ids=torch.tensor([ids])).logits[0].float()


def reference_greedy(base, prompt: list[int], params: SamplingParams, adapter) -> list[int]:
    generated: list[int] = []
    for _ in range(params.max_tokens):
        logits = full_forward_logits(base, prompt + generated, adapter)[-1]
        processed = reference_processed(logits.tolist(), prompt, generated, params)
        generated.append(max(range(len(processed)), key=processed.__getitem__))
    return generated


MIXED = [  # (prompt index, adapter, settings): neighbours in one batch, each with other settings
    (0, "alpha", {"presence_penalty": 1.5, "frequency_penalty": 1.0}),
    (1, None, {"repetition_penalty": 2.0}),
    (2, "beta", {"logit_bias": ((1000, 15.0), (2000, 12.0))}),
    (3, "alpha", {}),
    (4, None, {"frequency_penalty": -2.0, "logit_bias": ((42, -100.0),)}),
]


def test_penalties_and_bias_stay_in_their_rows(tiny_llama_base, loaded):
    base = tiny_llama_base
    jobs = [(base.tokenizer(PROMPTS[p])["input_ids"],
             SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True, **settings), loaded.get(name))
            for p, name, settings in MIXED]
    steps: list = []
    together = run_batch(base, jobs, steps=steps)
    assert ("prefill", len(jobs)) in steps and ("decode", len(jobs)) in steps  # one mixed batch
    for job, collector in zip(jobs, together):
        alone = run_batch(base, [job])[0]
        assert collector.tokens() == alone.tokens()
        assert collector.tokens() == reference_greedy(base, list(job[0]), job[1], job[2])
        if job[1] != SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True):  # the settings change the output
            plain = SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True)
            assert collector.tokens() != reference_greedy(base, list(job[0]), plain, job[2])
    plain = run_batch(base, [(jobs[3][0], SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True), jobs[3][2])])[0]
    assert together[3].tokens() == plain.tokens()  # the row without settings is the plain path's
    assert together[2].tokens()[0] in (1000, 2000)  # the bias is big enough to show
    assert 42 not in together[4].tokens()


def test_seeded_sampling_with_penalties_is_the_same_alone_and_mixed(tiny_llama_base, loaded):
    base = tiny_llama_base
    hot = SamplingParams(max_tokens=NEW_TOKENS, temperature=1.2, seed=5, ignore_eos=True, presence_penalty=2.0,
                         repetition_penalty=1.5)
    job = (base.tokenizer(PROMPTS[0])["input_ids"], hot, loaded["beta"])
    neighbours = [(base.tokenizer(p)["input_ids"], SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True,
                                                                   frequency_penalty=-1.0), loaded["alpha"])
                  for p in PROMPTS[1:3]]
    mixed = run_batch(base, [*neighbours, job])[-1]
    assert mixed.tokens() == run_batch(base, [job])[0].tokens()
