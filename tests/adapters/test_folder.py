"""Reading adapter folders: stock PEFT output loads as it is; everything unsafe or inconsistent is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from adapters import AdapterFormatError, read_adapter_folder
from tests.adapters.peft_folders import (
    NUM_LABELS, TINY_LORA, copy_folder, edit_tensors, make_peft_model, save_classifier_adapter,
)

HIDDEN = 64  # tests/conftest.py TINY_HIDDEN
KV_OUT = 32  # 2 KV heads x head_dim 16
PEFT_PREFIX = "base_model.model."


def test_stock_peft_folder_loads_with_peft_tensors(tmp_path, tiny_llama_dir):
    peft_model = make_peft_model(tiny_llama_dir)
    peft_model.save_pretrained(tmp_path / "adapter")
    assert not (tmp_path / "adapter" / "manifest.json").exists()

    adapter = read_adapter_folder(tmp_path / "adapter")

    assert adapter.manifest is None and adapter.task == "completion" and adapter.labels == ()
    assert sorted(adapter.lora) == [f"model.layers.{i}.self_attn.{m}" for i in range(2) for m in ("q_proj", "v_proj")]
    assert adapter.extra == {}
    q = adapter.lora["model.layers.0.self_attn.q_proj"]
    v = adapter.lora["model.layers.1.self_attn.v_proj"]
    assert q.a.shape == (TINY_LORA["r"], HIDDEN) and q.b.shape == (HIDDEN, TINY_LORA["r"]) and q.rank == 4
    assert v.a.shape == (4, HIDDEN) and v.b.shape == (KV_OUT, 4)
    assert q.scaling == v.scaling == TINY_LORA["lora_alpha"] / TINY_LORA["r"]
    peft_v = peft_model.get_submodule(PEFT_PREFIX + "model.layers.1.self_attn.v_proj")
    torch.testing.assert_close(v.a, peft_v.lora_A["default"].weight.detach(), atol=0, rtol=0)
    torch.testing.assert_close(v.b, peft_v.lora_B["default"].weight.detach(), atol=0, rtol=0)
    lora_params = sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" in n)
    assert adapter.num_parameters() == lora_params


def test_seq_cls_adapter_carries_its_head(tmp_path, tiny_bert_dir):
    save_classifier_adapter(tiny_bert_dir, tmp_path / "cls")
    adapter = read_adapter_folder(tmp_path / "cls")
    assert adapter.task == "classification" and adapter.spec.task_type == "SEQ_CLS"
    assert set(adapter.extra) == {"classifier.weight", "classifier.bias"}
    assert adapter.extra["classifier.weight"].shape == (NUM_LABELS, HIDDEN)
    assert adapter.extra["classifier.bias"].shape == (NUM_LABELS,)
    # module names are relative to the ...ForSequenceClassification model PEFT wrapped
    assert "bert.encoder.layer.0.attention.self.query" in adapter.lora
    assert len(adapter.lora) == 4


def test_pickle_only_folder_is_refused(tmp_path, peft_folder):
    folder = copy_folder(peft_folder, tmp_path / "pickled")
    (folder / "adapter_model.safetensors").unlink()
    torch.save({}, folder / "adapter_model.bin")
    with pytest.raises(AdapterFormatError, match="pickle") as err:
        read_adapter_folder(folder)
    assert "adapter_model.bin" in str(err.value) and "safetensors" in str(err.value)


@pytest.mark.parametrize("damage,fragment", [
    (lambda f: (f / "adapter_config.json").unlink(), "adapter_config.json is missing"),
    (lambda f: (f / "adapter_model.safetensors").unlink(), "adapter_model.safetensors is missing"),
    (lambda f: (f / "adapter_config.json").write_text("{nope"), "not valid JSON"),
    (lambda f: (f / "adapter_config.json").write_text("[1, 2]"), "JSON object"),
    (lambda f: (f / "adapter_model.safetensors").write_bytes(b"garbage"), "safetensors"),
], ids=["no-config", "no-weights", "bad-json", "json-list", "bad-safetensors"])
def test_broken_folders_are_refused(tmp_path, peft_folder, damage, fragment):
    folder = copy_folder(peft_folder, tmp_path / "broken")
    damage(folder)
    with pytest.raises(AdapterFormatError, match=fragment):
        read_adapter_folder(folder)


def test_a_file_is_not_a_folder(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(AdapterFormatError, match="not a directory"):
        read_adapter_folder(tmp_path / "file")
    with pytest.raises(AdapterFormatError, match="not a directory"):
        read_adapter_folder(tmp_path / "nowhere")


def _first_a(tensors: dict[str, torch.Tensor]) -> str:
    return next(k for k in sorted(tensors) if "lora_A" in k)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_tensors_are_refused(tmp_path, peft_folder, value):
    folder = copy_folder(peft_folder, tmp_path / "nonfinite")
    edit_tensors(folder, lambda t: t[_first_a(t)].__setitem__((1, 2), value))
    with pytest.raises(AdapterFormatError, match="NaN or Inf"):
        read_adapter_folder(folder)


@pytest.mark.parametrize("dtype,fragment", [(torch.float64, "float64"), (torch.int32, "floating dtype")])
def test_bad_dtypes_are_refused(tmp_path, peft_folder, dtype, fragment):
    folder = copy_folder(peft_folder, tmp_path / "dtype")
    edit_tensors(folder, lambda t: t.__setitem__(_first_a(t), t[_first_a(t)].to(dtype)))
    with pytest.raises(AdapterFormatError, match=fragment):
        read_adapter_folder(folder)


def test_half_precision_weights_load(tmp_path, peft_folder):
    folder = copy_folder(peft_folder, tmp_path / "bf16")
    edit_tensors(folder, lambda t: t.update({k: v.to(torch.bfloat16) for k, v in t.items()}))
    assert all(w.a.dtype == torch.bfloat16 for w in read_adapter_folder(folder).lora.values())


def test_rank_in_config_must_match_tensors(tmp_path, peft_folder):
    folder = copy_folder(peft_folder, tmp_path / "rank")
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "r": 8}))
    with pytest.raises(AdapterFormatError, match="rank 4 but adapter_config.json says r=8"):
        read_adapter_folder(folder)


def test_a_and_b_must_share_a_rank(tmp_path, peft_folder):
    folder = copy_folder(peft_folder, tmp_path / "ab")
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    edit_tensors(folder, lambda t: t.__setitem__(key, t[key][:, :3].contiguous()))
    with pytest.raises(AdapterFormatError, match="do not share a rank"):
        read_adapter_folder(folder)


def test_lora_a_without_lora_b_is_refused(tmp_path, peft_folder):
    folder = copy_folder(peft_folder, tmp_path / "lonely")
    edit_tensors(folder, lambda t: t.pop("base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"))
    with pytest.raises(AdapterFormatError, match="only one of lora_A / lora_B") as err:
        read_adapter_folder(folder)
    assert "model.layers.1.self_attn.v_proj" in str(err.value)


@pytest.mark.parametrize("suffix,fragment", [
    ("lora_magnitude_vector", "DoRA"), ("lora_embedding_A", "embeddings"), ("lora_C.weight", "not a LoRA weight"),
])
def test_unknown_lora_tensors_are_refused(tmp_path, peft_folder, suffix, fragment):
    folder = copy_folder(peft_folder, tmp_path / "extra")
    edit_tensors(folder, lambda t: t.__setitem__(f"base_model.model.model.layers.0.self_attn.q_proj.{suffix}",
                                                 torch.ones(4, 4)))
    with pytest.raises(AdapterFormatError, match=fragment):
        read_adapter_folder(folder)


def test_weights_without_lora_tensors_are_refused(tmp_path, peft_folder):
    folder = copy_folder(peft_folder, tmp_path / "empty")
    edit_tensors(folder, lambda t: (t.clear(), t.__setitem__("base_model.model.score.weight", torch.ones(2, 2))))
    with pytest.raises(AdapterFormatError, match="no LoRA weights"):
        read_adapter_folder(folder)


def test_fan_in_fan_out_is_refused(tmp_path, peft_folder):
    folder = copy_folder(peft_folder, tmp_path / "conv1d")
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "fan_in_fan_out": True}))
    with pytest.raises(AdapterFormatError, match="fan_in_fan_out"):
        read_adapter_folder(Path(folder))
