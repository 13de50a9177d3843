"""n > 1: one prefill whose KV is copied into the other choices' slots, each choice sampling on its own
(seeded per choice), in mixed batches; one ending per request, whatever the number of choices."""

from __future__ import annotations

import threading

import pytest
import torch

from server.engine.batch_runner import BatchRunner, RowInput
from server.engine.decode_state import DecodeState
from server.engine.generate import eos_ids
from server.engine.sampling import SamplingParams, choice_seed
from server.engine.scheduler import GenerationRequest, Scheduler, SchedulerLimits
from tests.server.test_sampling_penalties import (  # noqa: F401  (loaded: a fixture)
    MODEL_LOCK, PROMPTS, Choices, full_forward_logits, loaded, run_batch,
)

NEW_TOKENS = 8


def reference_choice(base, prompt: list[int], params: SamplingParams, adapter, choice: int) -> list[int]:
    """Choice `choice` decoded alone by the slow full forward, with that choice's DecodeState (its seed)."""
    state = DecodeState(params, base.tokenizer, eos_ids(base), base.backend.device, prompt, choice)
    tokens: list[int] = []
    while not state.finished:
        tokens.append(state.step(full_forward_logits(base, prompt + tokens, adapter)[-1]).token_id)
    return tokens


def test_copy_slot_copies_the_prefilled_prompt(tiny_llama_base):
    ids = tiny_llama_base.tokenizer(PROMPTS[0])["input_ids"]
    runner = BatchRunner(tiny_llama_base, num_slots=4, max_len=32)
    with MODEL_LOCK:
        runner.forward([RowInput(0, 0, ids, None), RowInput(3, 0, ids[:2], None)])  # slot 3: a neighbour's KV
        runner.cache.copy_slot(0, [1, 2], len(ids))
        decoded = runner.forward([RowInput(s, len(ids), [42], None) for s in range(3)])
        fresh = BatchRunner(tiny_llama_base, num_slots=1, max_len=32)
        fresh.forward([RowInput(0, 0, ids, None)])
        expected = fresh.forward([RowInput(0, len(ids), [42], None)])[0]
    for row in decoded:
        torch.testing.assert_close(row, expected, atol=1e-5, rtol=1e-5)


def test_choice_seeds_are_the_seed_then_distinct_and_stable():
    assert choice_seed(7, 0) == 7
    seeds = {choice_seed(7, i) for i in range(1, 50)}
    assert len(seeds) == 49 and 7 not in seeds
    assert choice_seed(7, 3) == choice_seed(7, 3) != choice_seed(8, 3)
    assert all(0 <= s < 2**64 for s in seeds)


def test_n_choices_prefill_once_and_sample_independently(tiny_llama_base, loaded):  # noqa: F811
    base = tiny_llama_base
    prompt = base.tokenizer(PROMPTS[1])["input_ids"]
    hot = SamplingParams(max_tokens=NEW_TOKENS, temperature=1.3, seed=21, ignore_eos=True, n=3)
    greedy = SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True, n=2, presence_penalty=1.0)
    neighbour = SamplingParams(max_tokens=NEW_TOKENS - 3, ignore_eos=True)
    steps: list = []
    hot_out, greedy_out, neighbour_out = run_batch(
        base, [(prompt, hot, loaded["alpha"]), (prompt, greedy, None),
               (base.tokenizer(PROMPTS[2])["input_ids"], neighbour, loaded["beta"])], steps=steps)
    assert steps[0] == ("prefill", 3)  # three requests, six choices: three prompt rows in one prefill
    assert ("decode", 6) in steps  # every choice decodes as its own row, in one batch
    choices = [hot_out.tokens(i) for i in range(3)]
    for i, tokens in enumerate(choices):
        assert tokens == reference_choice(base, prompt, hot, loaded["alpha"], i)
    assert len({tuple(t) for t in choices}) == 3  # independent draws
    single = SamplingParams(max_tokens=NEW_TOKENS, temperature=1.3, seed=21, ignore_eos=True)
    assert choices[0] == run_batch(base, [(prompt, single, loaded["alpha"])])[0].tokens()  # choice 0 is n=1's
    assert greedy_out.tokens(0) == greedy_out.tokens(1) == reference_choice(base, prompt, greedy, None, 0)
    assert neighbour_out.tokens() == reference_choice(base, base.tokenizer(PROMPTS[2])["input_ids"], neighbour,
                                                      loaded["beta"], 0)


def test_choices_wait_for_all_their_slots_fifo(tiny_llama_base):
    base = tiny_llama_base
    prompt = base.tokenizer(PROMPTS[3])["input_ids"]
    params = SamplingParams(max_tokens=4, ignore_eos=True, n=2)
    steps: list = []
    outs = run_batch(base, [(prompt, params, None)] * 3, max_running=3, steps=steps)  # 2 + 2 > 3: one at a time
    assert all(o.tokens(0) == o.tokens(1) == outs[0].tokens(0) for o in outs)
    assert max(size for phase, size in steps if phase == "decode") == 2
    sched = Scheduler(base, SchedulerLimits(max_running=3, max_len=64), MODEL_LOCK)
    with pytest.raises(ValueError, match="n=4"):
        sched.submit(GenerationRequest(prompt, SamplingParams(max_tokens=2, n=4), None, emit=lambda _: None))


def test_a_failed_step_ends_a_request_of_n_choices_once(tiny_llama_base, monkeypatch):
    base = tiny_llama_base
    sched = Scheduler(base, SchedulerLimits(max_running=4, max_len=64), MODEL_LOCK)
    calls = {"n": 0}
    real = sched.runner.forward_full

    def fail_on_first_decode(rows):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("boom")
        return real(rows)

    monkeypatch.setattr(sched.runner, "forward_full", fail_on_first_decode)
    outputs = []
    done = threading.Event()

    def emit(item):
        outputs.append(item)
        if isinstance(item, BaseException):
            done.set()

    sched.submit(GenerationRequest(base.tokenizer("hi")["input_ids"], SamplingParams(max_tokens=5, n=3), None, emit))
    sched.start()
    try:
        assert done.wait(30)
        after = Choices(2)
        sched.submit(GenerationRequest(base.tokenizer("hi")["input_ids"], SamplingParams(max_tokens=3, n=2), None,
                                       after))
        assert after.done.wait(30) and not after.errors  # the scheduler lives on
    finally:
        sched.stop()
    errors = [o for o in outputs if isinstance(o, BaseException)]
    assert len(errors) == 1 and str(errors[0]) == "boom"
    assert sorted(o.index for o in outputs if not isinstance(o, BaseException)) == [0, 1, 2]  # from the prefill
