"""The decode loop: greedy output equals PEFT's own generate, token for token; sampling settings behave."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from adapters import read_adapter_folder
from server.engine.generate import generate_tokens
from server.engine.loaded import load_adapter
from server.engine.sampling import Sampler, SamplingParams
from tests.server.conftest import CPU_FP32

PROMPT = "The quick brown fox jumps over"
NEW_TOKENS = 16


def _ids(base):
    return base.tokenizer(PROMPT)["input_ids"]


def _run(base, params, adapter=None):
    return list(generate_tokens(base, _ids(base), params, adapter))


@pytest.mark.parametrize("adapter_name", ["alpha", "beta", None])
def test_greedy_equals_peft_generate(tiny_llama_base, tiny_llama_dir, tiny_adapters, adapter_name):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    adapter = None
    if adapter_name:
        model = PeftModel.from_pretrained(model, tiny_adapters[adapter_name]).eval()
        adapter = load_adapter(adapter_name, 1, read_adapter_folder(tiny_adapters[adapter_name]),
                               CPU_FP32.device, CPU_FP32.dtype)
    ids = torch.tensor([_ids(tiny_llama_base)])
    with torch.no_grad():
        ref = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                             do_sample=False)[0, ids.shape[1]:].tolist()
    ours = [d.token_id for d in _run(tiny_llama_base, SamplingParams(max_tokens=NEW_TOKENS), adapter)]
    assert ours == ref


def test_max_tokens_finishes_with_length(tiny_llama_base):
    deltas = _run(tiny_llama_base, SamplingParams(max_tokens=5, ignore_eos=True))
    assert len(deltas) == 5
    assert deltas[-1].finish_reason == "length"
    assert all(d.finish_reason is None for d in deltas[:-1])


def test_stop_string_cuts_text(tiny_llama_base):
    full = "".join(d.text for d in _run(tiny_llama_base, SamplingParams(max_tokens=12, ignore_eos=True)))
    assert len(full) > 6
    stop = full[4:7]
    deltas = _run(tiny_llama_base, SamplingParams(max_tokens=12, ignore_eos=True, stop=(stop,)))
    text = "".join(d.text for d in deltas)
    assert deltas[-1].finish_reason == "stop"
    assert text == full[: full.find(stop)]


def test_seeded_sampling_is_reproducible_and_seed_dependent(tiny_llama_base):
    def sample(seed):
        params = SamplingParams(max_tokens=10, temperature=1.5, seed=seed, ignore_eos=True)
        return [d.token_id for d in _run(tiny_llama_base, params)]

    assert sample(7) == sample(7)
    assert sample(7) != sample(8)


def test_top_k_one_and_tiny_top_p_are_greedy(tiny_llama_base):
    greedy = [d.token_id for d in _run(tiny_llama_base, SamplingParams(max_tokens=8, ignore_eos=True))]
    top_k = SamplingParams(max_tokens=8, temperature=1.0, top_k=1, seed=1, ignore_eos=True)
    top_p = SamplingParams(max_tokens=8, temperature=1.0, top_p=1e-6, seed=1, ignore_eos=True)
    assert [d.token_id for d in _run(tiny_llama_base, top_k)] == greedy
    assert [d.token_id for d in _run(tiny_llama_base, top_p)] == greedy


def test_sampler_never_picks_banned_tokens():
    logits = torch.tensor([0.0, 10.0, 9.0, -1.0])
    assert Sampler(SamplingParams(max_tokens=1), torch.device("cpu"))(logits, banned=[1]) == 2
    hot = Sampler(SamplingParams(max_tokens=1, temperature=1.0, seed=0), torch.device("cpu"))
    assert all(hot(logits, banned=[1]) != 1 for _ in range(50))
