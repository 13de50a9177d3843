"""The real SmolLM2 base: the prepared tokenizer/model answer correctly, and adapters match PEFT exactly."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from adapters import read_adapter_folder
from server.engine.generate import generate_tokens
from server.engine.loaded import load_adapter
from server.engine.sampling import SamplingParams
from tests.integration.conftest import CPU_FP32, example_adapters

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
NEW_TOKENS = 24


def _chat_ids(base):
    return base.tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=True)


def _greedy(base, ids, adapter=None, max_tokens=NEW_TOKENS):
    deltas = list(generate_tokens(base, list(ids), SamplingParams(max_tokens=max_tokens), adapter))
    return [d.token_id for d in deltas], "".join(d.text for d in deltas)


def test_prepared_smollm2_answers_paris(smollm2):
    assert smollm2.can_generate
    ids = _chat_ids(smollm2)
    assert ids.count(smollm2.tokenizer.bos_token_id) == 3  # the template's own <|im_start|> markers, no stray BOS
    _, text = _greedy(smollm2, ids, max_tokens=20)
    assert "Paris" in text


def _peft_reference(smollm2_base, adapter_dir, ids):
    model = AutoModelForCausalLM.from_pretrained(smollm2_base.path, dtype=torch.float32)
    model = PeftModel.from_pretrained(model, adapter_dir).eval()
    prompt = torch.tensor([list(ids)])
    with torch.no_grad():
        out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=NEW_TOKENS,
                             do_sample=False)
    return out[0, prompt.shape[1]:].tolist()


def test_random_completion_adapter_greedy_equals_peft(smollm2, smollm2_base, random_completion_adapter):
    ids = _chat_ids(smollm2)
    adapter = load_adapter("random", 1, read_adapter_folder(random_completion_adapter), CPU_FP32.device, CPU_FP32.dtype)
    ours, _ = _greedy(smollm2, ids, adapter)
    base_tokens, _ = _greedy(smollm2, ids)
    assert ours != base_tokens
    assert ours == _peft_reference(smollm2_base, random_completion_adapter, ids)


@pytest.mark.parametrize("name", sorted(example_adapters("completion")))
def test_example_adapter_greedy_equals_peft(smollm2, smollm2_base, name):
    folder = example_adapters("completion")[name]
    ids = smollm2.tokenizer.apply_chat_template([{"role": "user", "content": "How do I reset my password?"}],
                                                add_generation_prompt=True, tokenize=True)
    adapter = load_adapter(name, 1, read_adapter_folder(folder), CPU_FP32.device, CPU_FP32.dtype)
    ours, _ = _greedy(smollm2, ids, adapter)
    assert ours == _peft_reference(smollm2_base, folder, ids)


def test_there_are_two_example_completion_adapters():
    assert len(example_adapters("completion")) >= 2
