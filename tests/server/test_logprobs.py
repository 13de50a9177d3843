"""Logprobs are log-softmax of the raw logits: equal (1e-4, fp32) to a plain HF / PEFT forward of the same
model and adapter over prompt + generated tokens, for rows of one mixed batch with other settings, and
for the prompt's own tokens (echo) at prefill."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from server.engine.logprobs import prompt_logprobs, sampled_logprob
from server.engine.sampling import SamplingParams
from tests.server.test_sampling_penalties import PROMPTS, loaded, run_batch  # noqa: F401  (a fixture)

ATOL = 1e-4
NEW_TOKENS = 6


@pytest.fixture(scope="module")
def hf_models(tiny_llama_dir, tiny_adapters):
    """Plain HF for the base, PEFT for each adapter: the reference forwards (fp32, CPU)."""
    models = {None: AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()}
    for name, folder in tiny_adapters.items():
        models[name] = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), folder).eval()
    return models


def reference_logprobs(model, ids: list[int]) -> torch.Tensor:
    """[len(ids), vocab]: row j is log-softmax of the logits after ids[: j + 1]."""
    with torch.no_grad():
        return torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), dim=-1)


def assert_entry(entry, reference: torch.Tensor, token: int, top: int) -> None:
    """One position's entry against the reference row [vocab]: the token's logprob, and the top k values
    (ids compared through the reference, so that near-ties may come in either order)."""
    assert entry.token == token
    assert abs(entry.logprob - float(reference[token])) < ATOL
    assert len(entry.top) == top
    expected = torch.topk(reference, top).values if top else torch.tensor([])
    torch.testing.assert_close(torch.tensor([lp for _, lp in entry.top]), expected, atol=ATOL, rtol=0)
    for token_id, logprob in entry.top:
        assert abs(logprob - float(reference[token_id])) < ATOL


MIXED = [  # (prompt, adapter, settings): logprobs rows next to rows with other settings
    (0, "alpha", {"logprobs": 5, "prompt_logprobs": 5}),
    (1, None, {"logprobs": 3, "temperature": 0.8, "seed": 3, "presence_penalty": 2.0}),
    (2, "beta", {"logprobs": 0, "logit_bias": ((1000, 30.0),), "repetition_penalty": 1.4}),  # raw: before both
    (3, "alpha", {}),  # no logprobs asked: none computed
    (4, "beta", {"logprobs": 20, "prompt_logprobs": 0, "temperature": 1.5, "top_k": 5, "seed": 9}),
]


def test_logprobs_equal_a_plain_forward_in_a_mixed_batch(tiny_llama_base, loaded, hf_models):  # noqa: F811
    base = tiny_llama_base
    jobs = [(base.tokenizer(PROMPTS[p])["input_ids"], SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True, **s),
             loaded.get(name)) for p, name, s in MIXED]
    steps: list = []
    outputs = run_batch(base, jobs, steps=steps)
    assert ("decode", len(jobs)) in steps
    for (prompt, params, _), (_, name, _), out in zip(jobs, MIXED, outputs):
        tokens = out.tokens()
        if params.logprobs is None:
            assert all(d.logprob is None and d.prompt_logprobs is None for d in out.deltas)
            continue
        reference = reference_logprobs(hf_models[name], prompt + tokens)
        for step, delta in enumerate(out.deltas):
            assert_entry(delta.logprob, reference[len(prompt) - 1 + step], delta.token_id, params.logprobs)
        first = out.deltas[0].prompt_logprobs
        if params.prompt_logprobs is None:
            assert first is None
            continue
        assert len(first) == len(prompt) and first[0] is None
        assert all(d.prompt_logprobs is None for d in out.deltas[1:])
        for position, entry in enumerate(first[1:]):
            assert_entry(entry, reference[position], prompt[position + 1], params.prompt_logprobs)
    assert outputs[2].tokens()[0] == 1000  # the biased token was sampled, its logprob reported raw (above)


def test_the_helpers_on_known_numbers():
    logits = torch.tensor([1.0, 3.0, 2.0, float("-inf")])
    expected = torch.log_softmax(logits, dim=-1)
    entry = sampled_logprob(logits, 2, top=2)
    assert entry.token == 2 and entry.logprob == pytest.approx(float(expected[2]))
    assert [t for t, _ in entry.top] == [1, 2]
    assert sampled_logprob(logits, 3, top=0).logprob == float("-inf") and sampled_logprob(logits, 3, 0).top == ()
    rows = torch.stack([logits, logits.flip(0)])
    entries = prompt_logprobs(rows, [7, 1, 0], top=1)
    assert entries[0] is None and entries[1].token == 1 and entries[2].token == 0
    assert entries[1].logprob == pytest.approx(float(expected[1]))  # row 0 predicts the second token
    assert entries[2].top[0][0] == 2 and entries[2].logprob == float("-inf")  # row 1 is flipped: id 0 is -inf
    assert prompt_logprobs(rows[:0], [5], top=3) == (None,)


@pytest.fixture(scope="module")
def prompt_learning(tmp_path_factory, tiny_llama_dir):
    from peft import PrefixTuningConfig, PromptTuningConfig, TaskType

    from tests.server.conftest import make_peft_folder

    root = tmp_path_factory.mktemp("logprobs-prompt-learning")
    configs = {"prompt": PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=5),
               "prefix": PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=4)}
    return {name: make_peft_folder(tiny_llama_dir, root / name, config, 31 + i, "prompt_encoder",
                                   lambda p: p.normal_(0, 1.0)) for i, (name, config) in enumerate(configs.items())}


def test_prompt_logprobs_skip_a_prompt_learning_adapters_virtual_positions(tiny_llama_base, tiny_llama_dir,
                                                                          prompt_learning):
    """Prompt tuning's placeholders come first in its prefill row, a prefix sits in the slot before it: either
    way the logprobs are the prompt's own (PEFT's logits at the prompt's positions), for every choice."""
    from tests.server.conftest import load_folder

    base = tiny_llama_base
    adapters = {name: load_folder(folder, base, name) for name, folder in prompt_learning.items()}
    params = SamplingParams(max_tokens=4, ignore_eos=True, logprobs=2, prompt_logprobs=2, n=2)
    jobs = [(base.tokenizer(PROMPTS[i])["input_ids"], params, adapters[name]) for i, name in enumerate(adapters)]
    for (prompt, _, _), name, out in zip(jobs, adapters, run_batch(base, jobs)):
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_dir),
                                          prompt_learning[name]).eval()
        for choice in range(2):
            deltas = [d for d in out.deltas if d.index == choice]
            ids = prompt + [d.token_id for d in deltas]
            with torch.no_grad():  # prompt tuning's logits include its virtual positions: keep the last len(ids)
                reference = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, -len(ids):].float(), -1)
            first = deltas[0].prompt_logprobs
            assert first[0] is None and len(first) == len(prompt)
            for position, entry in enumerate(first[1:]):
                assert_entry(entry, reference[position], prompt[position + 1], 2)
            for step, delta in enumerate(deltas):
                assert_entry(delta.logprob, reference[len(prompt) - 1 + step], delta.token_id, 2)
