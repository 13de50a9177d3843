"""Merge math against a plain reference, and PEFT's merge-equivalence test on the tiny Llama."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from adapters import LoraWeights, read_adapter_folder
from adapters.merge import lora_delta, merge_into, unmerge_from
from tests.adapters.peft_folders import make_peft_model

FP32_ATOL = 1e-5
VISIBLE_CHANGE = 1e-2  # the adapter must move the logits well past the tolerance, or the test proves nothing


def _random_lora(out_features: int, in_features: int, rank: int, scaling: float) -> LoraWeights:
    gen = torch.Generator().manual_seed(0)
    return LoraWeights(a=torch.randn(rank, in_features, generator=gen),
                       b=torch.randn(out_features, rank, generator=gen), scaling=scaling)


def test_delta_equals_a_loop_over_rank():
    lora = _random_lora(6, 5, 3, 0.25)
    reference = torch.zeros(6, 5)
    for k in range(3):  # sum of rank-one outer products
        reference += 0.25 * torch.outer(lora.b[:, k], lora.a[k])
    torch.testing.assert_close(lora_delta(lora), reference)


def test_merge_then_unmerge_returns_the_weight():
    weight = torch.randn(32, 16, generator=torch.Generator().manual_seed(1))
    original = weight.clone()
    lora = _random_lora(32, 16, 4, 0.5)
    merge_into(weight, lora)
    torch.testing.assert_close(weight, original + 0.5 * lora.b @ lora.a)
    assert (weight - original).abs().max() > 1.0
    unmerge_from(weight, lora)
    torch.testing.assert_close(weight, original, atol=FP32_ATOL, rtol=0)


def test_merge_keeps_the_weight_dtype():
    weight = torch.zeros(8, 4, dtype=torch.bfloat16)
    merge_into(weight, _random_lora(8, 4, 2, 1.0))
    assert weight.dtype == torch.bfloat16 and weight.abs().sum() > 0


@pytest.mark.parametrize("config", [
    {},
    {"r": 8, "lora_alpha": 4, "use_rslora": True, "rank_pattern": {"v_proj": 2},
     "target_modules": ["q_proj", "v_proj", "down_proj"]},
], ids=["q-v", "rslora-patterns"])
def test_merged_base_gives_peft_logits(tmp_path, tiny_llama_dir, config):
    peft_model = make_peft_model(tiny_llama_dir, **config)
    peft_model.save_pretrained(tmp_path / "adapter")
    adapter = read_adapter_folder(tmp_path / "adapter")
    ids = torch.randint(5, 500, (2, 9), generator=torch.Generator().manual_seed(0))
    ours = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    with torch.no_grad():
        base_logits = ours(input_ids=ids).logits
        peft_unmerged = peft_model(input_ids=ids).logits
        for module, weights in adapter.lora.items():
            merge_into(ours.get_submodule(module).weight, weights)
        merged = ours(input_ids=ids).logits
        peft_merged = peft_model.merge_and_unload()(input_ids=ids).logits

    assert (peft_unmerged - base_logits).abs().max() > VISIBLE_CHANGE
    torch.testing.assert_close(merged, peft_unmerged, atol=FP32_ATOL, rtol=FP32_ATOL)
    torch.testing.assert_close(merged, peft_merged, atol=FP32_ATOL, rtol=FP32_ATOL)
    with torch.no_grad():
        for module, weights in adapter.lora.items():
            unmerge_from(ours.get_submodule(module).weight, weights)
        torch.testing.assert_close(ours(input_ids=ids).logits, base_logits, atol=FP32_ATOL, rtol=FP32_ATOL)
