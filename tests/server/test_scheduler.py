"""Continuous batching vs the single-request reference loop: same tokens, whatever joins or leaves."""

from __future__ import annotations

import threading

import pytest
import torch

from adapters import read_adapter_folder
from server.engine.generate import generate_tokens
from server.engine.loaded import load_adapter
from server.engine.sampling import SamplingParams
from server.engine.scheduler import GenerationRequest, QueueFullError, Scheduler, SchedulerLimits
from server.engine.worker import EngineStopped, RequestTimedOut
from tests.server.conftest import CPU_FP32, WAIT_S, Collector

PROMPTS = ["Once upon a time", "The capital of France is", "def fibonacci(n):", "I like to eat", "Hello!"]


@pytest.fixture(scope="module")
def loaded(tiny_adapters):
    return {name: load_adapter(name, 1, read_adapter_folder(path), CPU_FP32.device, CPU_FP32.dtype)
            for name, path in tiny_adapters.items()}


MODEL_LOCK = threading.Lock()  # the scheduler thread and these reference runs share one model


def _reference(base, prompt, params, adapter):
    with MODEL_LOCK:
        return [d.token_id for d in generate_tokens(base, base.tokenizer(prompt)["input_ids"], params, adapter)]


@pytest.fixture
def scheduler(tiny_llama_base):
    sched = Scheduler(tiny_llama_base, SchedulerLimits(max_running=4, max_waiting=8, max_len=128), MODEL_LOCK)
    sched.start()
    yield sched
    sched.stop()


def _submit(sched, base, prompt, params, adapter, cancel_after=None):
    collector = Collector(cancel_after)
    request = GenerationRequest(base.tokenizer(prompt)["input_ids"], params, adapter, emit=collector)
    collector.request = request
    sched.submit(request)
    return request, collector


def test_mixed_adapters_and_lengths_match_reference(scheduler, tiny_llama_base, loaded):
    adapters = [loaded["alpha"], None, loaded["beta"], loaded["alpha"], loaded["beta"]]
    lengths = [12, 3, 9, 1, 7]  # requests finish at different steps, so slots are freed and compacted
    jobs = []
    for prompt, adapter, n in zip(PROMPTS, adapters, lengths):
        params = SamplingParams(max_tokens=n, ignore_eos=True)
        jobs.append((_submit(scheduler, tiny_llama_base, prompt, params, adapter)[1], prompt, params, adapter))
    for collector, prompt, params, adapter in jobs:  # 5 requests, 4 slots: one waits and joins mid-decode
        assert collector.tokens == _reference(tiny_llama_base, prompt, params, adapter)


def test_late_arrivals_match_reference(scheduler, tiny_llama_base, loaded):
    long_params = SamplingParams(max_tokens=20, ignore_eos=True)
    _, first = _submit(scheduler, tiny_llama_base, PROMPTS[0], long_params, loaded["alpha"])
    while len(first.deltas) < 5:
        first.done.wait(0.01)
    late_params = SamplingParams(max_tokens=6, ignore_eos=True)
    _, late = _submit(scheduler, tiny_llama_base, PROMPTS[1], late_params, loaded["beta"])
    assert late.tokens == _reference(tiny_llama_base, PROMPTS[1], late_params, loaded["beta"])
    assert first.tokens == _reference(tiny_llama_base, PROMPTS[0], long_params, loaded["alpha"])


def test_seeded_sampling_does_not_leak_between_requests(scheduler, tiny_llama_base, loaded):
    hot = SamplingParams(max_tokens=8, temperature=1.3, top_k=50, seed=11, ignore_eos=True)
    greedy = SamplingParams(max_tokens=8, ignore_eos=True)
    _, a = _submit(scheduler, tiny_llama_base, PROMPTS[2], hot, loaded["beta"])
    _, b = _submit(scheduler, tiny_llama_base, PROMPTS[3], greedy, None)
    assert a.tokens == _reference(tiny_llama_base, PROMPTS[2], hot, loaded["beta"])
    assert b.tokens == _reference(tiny_llama_base, PROMPTS[3], greedy, None)


def test_queue_bound_and_cancellation(tiny_llama_base):
    sched = Scheduler(tiny_llama_base, SchedulerLimits(max_running=1, max_waiting=2, max_len=128), MODEL_LOCK)
    params = SamplingParams(max_tokens=50, ignore_eos=True)
    _, first = _submit(sched, tiny_llama_base, "hi", params, None, cancel_after=3)
    _, second = _submit(sched, tiny_llama_base, "hi", params, None)
    with pytest.raises(QueueFullError):
        _submit(sched, tiny_llama_base, "hi", params, None)
    sched.start()
    try:
        assert second.done.wait(WAIT_S)  # the cancelled request's only slot was freed for the waiting one
        assert len(first.deltas) == 3 and len(second.deltas) == params.max_tokens
    finally:
        sched.stop()


def test_too_long_request_is_refused(scheduler, tiny_llama_base):
    with pytest.raises(ValueError):
        _submit(scheduler, tiny_llama_base, "hi " * 10, SamplingParams(max_tokens=125), None)


def test_kv_cache_reads_a_view_when_slots_are_in_order(tiny_llama_base):
    from server.engine.batch_runner import BatchRunner, RowInput

    runner = BatchRunner(tiny_llama_base, 3, 32)
    ids = tiny_llama_base.tokenizer("abc def")["input_ids"]
    in_order = runner.forward([RowInput(0, 0, ids, None), RowInput(1, 0, ids, None)])
    swapped = runner.forward([RowInput(2, 0, ids, None), RowInput(0, 0, ids, None)])
    torch.testing.assert_close(in_order, swapped, atol=1e-5, rtol=1e-5)


def test_merge_mode_matches_unmerged_and_swaps(tiny_llama_base, loaded):
    """Merge mode: tokens equal the unmerged reference; base weights are restored after unmerge."""
    q_proj = tiny_llama_base.model.get_submodule("model.layers.0.self_attn.q_proj").base.weight
    original = q_proj.clone()
    sched = Scheduler(tiny_llama_base, SchedulerLimits(max_running=4, max_len=128), MODEL_LOCK, merge=True)
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    order = [loaded["alpha"], loaded["alpha"], None, loaded["beta"], loaded["alpha"]]
    jobs = [(_submit(sched, tiny_llama_base, PROMPTS[i], params, a)[1], PROMPTS[i], a) for i, a in enumerate(order)]
    sched.start()
    try:
        results = [collector.tokens for collector, _, _ in jobs]
    finally:
        sched.stop()
    assert sched.merger.swaps == 5  # alpha, base, beta, alpha, then back to the base at stop
    torch.testing.assert_close(q_proj, original, atol=1e-6, rtol=0)
    for tokens, (_, prompt, adapter) in zip(results, jobs):
        assert tokens == _reference(tiny_llama_base, prompt, params, adapter)


LONG = SamplingParams(max_tokens=100, ignore_eos=True)  # outlives each test's stop / abort / timeout


def _wait_for_first_token(collector: Collector) -> None:
    while not collector.deltas:
        assert not collector.done.wait(0.01), "the request ended before its first token"


def test_stop_answers_running_and_queued_requests(tiny_llama_base):
    """Regression: at shutdown only the running requests were told; queued ones never got an answer."""
    sched = Scheduler(tiny_llama_base, SchedulerLimits(max_running=1, max_waiting=8, max_len=128), MODEL_LOCK)
    collectors = [_submit(sched, tiny_llama_base, "hi", LONG, None)[1] for _ in range(3)]
    sched.start()
    _wait_for_first_token(collectors[0])
    sched.stop()  # joins the thread: every answer has been emitted by now
    assert all(c.done.is_set() for c in collectors)
    assert all(isinstance(c.error, EngineStopped) for c in collectors)
    with pytest.raises(EngineStopped):  # nothing would run it
        _submit(sched, tiny_llama_base, "hi", LONG, None)


def test_abort_fails_everything_and_refuses_new_requests(tiny_llama_base):
    sched = Scheduler(tiny_llama_base, SchedulerLimits(max_running=1, max_waiting=8, max_len=128), MODEL_LOCK)
    collectors = [_submit(sched, tiny_llama_base, "hi", LONG, None)[1] for _ in range(3)]
    sched.start()
    try:
        _wait_for_first_token(collectors[0])
        reason = EngineStopped("shutdown timeout")
        sched.abort(reason)
        assert all(c.done.wait(WAIT_S) for c in collectors)
        assert all(c.error is reason for c in collectors)
        with pytest.raises(EngineStopped):
            _submit(sched, tiny_llama_base, "hi", LONG, None)
    finally:
        sched.stop()


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class AdvanceClockAfter(Collector):
    """Moves the scheduler's clock past every deadline once `after` tokens have arrived."""

    def __init__(self, clock: FakeClock, after: int) -> None:
        super().__init__()
        self.clock, self.after = clock, after

    def __call__(self, item) -> None:
        super().__call__(item)
        if len(self.deltas) == self.after:
            self.clock.now += 1000


def test_request_timeout_fails_running_and_waiting_and_frees_the_slot(tiny_llama_base):
    clock = FakeClock()
    sched = Scheduler(tiny_llama_base, SchedulerLimits(max_running=1, max_waiting=8, max_len=128), MODEL_LOCK,
                      request_timeout=10, clock=clock)
    prompt_ids = tiny_llama_base.tokenizer("hi")["input_ids"]
    running = AdvanceClockAfter(clock, after=3)
    sched.submit(GenerationRequest(prompt_ids, LONG, None, emit=running))
    _, waiting = _submit(sched, tiny_llama_base, "hi", LONG, None)
    sched.start()
    try:
        assert running.done.wait(WAIT_S) and waiting.done.wait(WAIT_S)
        assert isinstance(running.error, RequestTimedOut) and len(running.deltas) == 3  # stopped at its deadline
        assert isinstance(waiting.error, RequestTimedOut) and waiting.deltas == []
        assert "request timeout of 10 s" in str(running.error)
        params = SamplingParams(max_tokens=8, ignore_eos=True)
        _, after = _submit(sched, tiny_llama_base, PROMPTS[1], params, None)  # the one slot, reused
        assert after.tokens == _reference(tiny_llama_base, PROMPTS[1], params, None)  # no stale KV either
    finally:
        sched.stop()
