"""Atomic writes, the store, merge math (PEFT's merge equivalence), fingerprints and base resolution."""

from __future__ import annotations

import shutil

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from adapters import AdapterNameError, AdapterStore, BaseNotFoundError, LoraWeights, atomic_directory, read_adapter_folder
from adapters import resolve_base
from adapters.fingerprint import fingerprint_base_folder
from adapters.merge import merge_into, unmerge_from


def test_atomic_directory_success_replaces_and_failure_leaves_nothing(tmp_path):
    dest = tmp_path / "out"
    with atomic_directory(dest) as tmp:
        (tmp / "a.txt").write_text("one")
    with atomic_directory(dest) as tmp:
        (tmp / "b.txt").write_text("two")
    assert sorted(p.name for p in dest.iterdir()) == ["b.txt"]
    with pytest.raises(RuntimeError):
        with atomic_directory(dest) as tmp:
            (tmp / "c.txt").write_text("half")
            raise RuntimeError("crash mid-write")
    assert sorted(p.name for p in dest.iterdir()) == ["b.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary folder left behind


def test_store_install_replace_remove(tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    (source / "adapter_config.json").write_text("{}")
    store = AdapterStore(tmp_path / "store")
    assert store.names() == []
    store.install("one", source)
    (source / "adapter_config.json").write_text('{"v": 2}')
    store.install("one", source)
    assert store.names() == ["one"]
    assert (store.path("one") / "adapter_config.json").read_text() == '{"v": 2}'
    assert store.remove("one") and not store.remove("one")
    for bad in ("../escape", "a/b"):
        with pytest.raises(AdapterNameError):
            store.install(bad, source)


def test_merge_unmerge_round_trip():
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(32, 16, generator=gen)
    original = weight.clone()
    lora = LoraWeights(a=torch.randn(4, 16, generator=gen), b=torch.randn(32, 4, generator=gen), scaling=0.5)
    merge_into(weight, lora)
    torch.testing.assert_close(weight, original + 0.5 * lora.b @ lora.a)
    unmerge_from(weight, lora)
    torch.testing.assert_close(weight, original, atol=1e-5, rtol=0)


def test_merged_weights_equal_peft_unmerged_and_merge_and_unload(tmp_path, tiny_llama_dir):
    torch.manual_seed(0)
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama_dir),
                                LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                           init_lora_weights=False)).eval()
    peft_model.save_pretrained(tmp_path / "adapter")
    ids = torch.randint(5, 500, (2, 9))
    with torch.no_grad():
        unmerged = peft_model(input_ids=ids).logits
        ours = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
        for module, weights in read_adapter_folder(tmp_path / "adapter").lora.items():
            merge_into(ours.get_submodule(module).weight, weights)
        merged = ours(input_ids=ids).logits
        peft_merged = peft_model.merge_and_unload()(input_ids=ids).logits
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(merged, peft_merged, atol=1e-5, rtol=1e-5)


def test_fingerprint_is_stable_and_sees_weight_changes(tmp_path, tiny_llama_dir):
    first = fingerprint_base_folder(tiny_llama_dir)
    assert first == fingerprint_base_folder(tiny_llama_dir)
    copy = tmp_path / "copy"
    shutil.copytree(tiny_llama_dir, copy)
    assert fingerprint_base_folder(copy) == first
    tensors = load_file(copy / "model.safetensors")
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] + 1
    save_file(tensors, copy / "model.safetensors", metadata={"format": "pt"})
    assert fingerprint_base_folder(copy) != first


def test_resolve_base_local_folder_and_unknown(tmp_path, tiny_llama_dir):
    base = resolve_base(str(tiny_llama_dir), tmp_path)
    assert base.path == tiny_llama_dir and base.fingerprint == fingerprint_base_folder(tiny_llama_dir)
    with pytest.raises(BaseNotFoundError, match="smollm2-135m"):
        resolve_base("no-such-model", tmp_path)


@pytest.mark.integration
def test_prepared_smollm2_tokenizer_follows_gguf_metadata(smollm2_base):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_base.path)
    assert tokenizer("Hello")["input_ids"][0] != tokenizer.bos_token_id
    assert tokenizer.eos_token == "<|im_end|>"
