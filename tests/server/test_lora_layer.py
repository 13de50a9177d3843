"""Our per-row LoRA layers vs PEFT itself (the obviously-correct reference), fp32 on CPU."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from adapters import read_adapter_folder
from server.engine.loaded import load_adapter
from tests.server.conftest import CPU_FP32


@pytest.fixture(scope="module")
def peft_model(tiny_llama_dir, tiny_adapters):
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), tiny_adapters["alpha"],
                                      adapter_name="alpha")
    model.load_adapter(tiny_adapters["beta"], adapter_name="beta")
    return model.eval()


def _loaded(name, path):
    return load_adapter(name, 1, read_adapter_folder(path), CPU_FP32.device, CPU_FP32.dtype)


@pytest.mark.parametrize("kernel", ["stacked", "loop"])
def test_mixed_batch_logits_match_peft_mixed_batch(request, kernel, tiny_adapters, peft_model):
    tiny_llama_base = request.getfixturevalue("tiny_llama_base" if kernel == "stacked" else "tiny_llama_base_loop")
    alpha, beta = _loaded("alpha", tiny_adapters["alpha"]), _loaded("beta", tiny_adapters["beta"])
    torch.manual_seed(0)
    ids = torch.randint(5, 1000, (4, 7))
    rows = [alpha, None, beta, alpha]
    with torch.no_grad(), tiny_llama_base.adapters_for_rows(rows):
        ours = tiny_llama_base.model(input_ids=ids).logits
    with torch.no_grad():
        ref = peft_model(input_ids=ids, adapter_names=["alpha", "__base__", "beta", "alpha"]).logits
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_single_adapter_fast_path_equals_indexed_path(tiny_llama_base, tiny_adapters):
    beta = _loaded("beta", tiny_adapters["beta"])
    ids = torch.randint(5, 1000, (3, 5))
    with torch.no_grad(), tiny_llama_base.adapters_for_rows([beta, beta, beta]):
        shared = tiny_llama_base.model(input_ids=ids).logits
    with torch.no_grad(), tiny_llama_base.adapters_for_rows([beta, beta, None]):
        indexed = tiny_llama_base.model(input_ids=ids).logits
    torch.testing.assert_close(shared[:2], indexed[:2], atol=1e-6, rtol=1e-6)


def test_adapter_changes_output_and_base_rows_stay_base(tiny_llama_base, tiny_adapters):
    alpha = _loaded("alpha", tiny_adapters["alpha"])
    ids = torch.randint(5, 1000, (2, 5))
    with torch.no_grad():
        base_only = tiny_llama_base.model(input_ids=ids).logits
        with tiny_llama_base.adapters_for_rows([None, alpha]):
            mixed = tiny_llama_base.model(input_ids=ids).logits
    torch.testing.assert_close(mixed[0], base_only[0], atol=0, rtol=0)
    assert (mixed[1] - base_only[1]).abs().max() > 1e-3


def test_active_adapters_cleared_after_block(tiny_llama_base, tiny_adapters):
    alpha = _loaded("alpha", tiny_adapters["alpha"])
    with pytest.raises(RuntimeError):
        with tiny_llama_base.adapters_for_rows([alpha]):
            raise RuntimeError("boom")
    assert tiny_llama_base.active.groups == []
