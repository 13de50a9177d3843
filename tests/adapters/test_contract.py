"""The adapter folder contract: names, config parsing, reading PEFT folders, manifest, validation."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, TaskType, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, LlamaConfig, LlamaForCausalLM

from adapters import (
    AdapterFormatError, AdapterMismatchError, AdapterNameError, BaseSignature, Manifest, parse_lora_config,
    read_adapter_folder, read_manifest, validate_adapter_name, validate_against_base, write_manifest,
)
from adapters.fingerprint import fingerprint_base_folder


def _peft_folder(base_dir: Path, out: Path, **config) -> Path:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    defaults = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "init_lora_weights": False}
    get_peft_model(model, LoraConfig(**{**defaults, **config})).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def peft_folder(tmp_path_factory, tiny_llama_dir) -> Path:
    return _peft_folder(tiny_llama_dir, tmp_path_factory.mktemp("peft") / "adapter")


def _copy(folder: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "copy"
    shutil.copytree(folder, dest)
    return dest


@pytest.mark.parametrize("name", ["a", "tenant-42", "my_adapter.v2", "A1"])
def test_good_names(name):
    assert validate_adapter_name(name) == name


@pytest.mark.parametrize("name", ["", "../x", "a/b", "a\\b", ".hidden", "x" * 129, "has space", "-lead", "a..b"])
def test_bad_names(name):
    with pytest.raises(AdapterNameError):
        validate_adapter_name(name)


def test_spec_scaling_patterns_and_targets():
    spec = parse_lora_config({"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"],
                              "rank_pattern": {"v_proj": 4}, "alpha_pattern": {"v_proj": 2}})
    assert spec.scaling_for("model.layers.0.self_attn.q_proj") == 2.0
    assert spec.rank_for("model.layers.0.self_attn.v_proj") == 4
    assert spec.scaling_for("model.layers.0.self_attn.v_proj") == 0.5
    assert spec.targets("model.layers.3.self_attn.q_proj") and not spec.targets("model.layers.3.mlp.up_proj")
    rs = parse_lora_config({"r": 16, "lora_alpha": 8, "target_modules": ".*\\.q_proj", "use_rslora": True})
    assert math.isclose(rs.scaling_for("x.q_proj"), 8 / 4)
    assert rs.targets("model.layers.0.self_attn.q_proj") and not rs.targets("model.layers.0.self_attn.k_proj")


@pytest.mark.parametrize("raw,fragment", [
    ({"r": 8, "target_modules": ["q"], "use_dora": True}, "DoRA"),
    ({"r": 8, "target_modules": ["q"], "bias": "all"}, "bias"),
    ({"r": 0, "target_modules": ["q"]}, "'r'"),
    ({"r": "8", "target_modules": ["q"]}, "'r'"),
    ({"r": 8, "target_modules": []}, "target_modules"),
    ({"r": 8, "target_modules": ["q"], "lora_alpha": float("nan")}, "lora_alpha"),
    ({"r": 8, "target_modules": ["q"], "peft_type": "IA3"}, "IA3"),
])
def test_spec_refusals(raw, fragment):
    with pytest.raises(AdapterFormatError, match=fragment):
        parse_lora_config(raw)


def test_stock_peft_folder_loads(peft_folder):
    adapter = read_adapter_folder(peft_folder)
    assert adapter.manifest is None and adapter.task == "completion"
    assert sorted(adapter.lora) == [f"model.layers.{i}.self_attn.{m}" for i in range(2) for m in ("q_proj", "v_proj")]
    q = adapter.lora["model.layers.0.self_attn.q_proj"]
    assert q.a.shape == (4, 64) and q.b.shape == (64, 4) and q.scaling == 2.0
    v = adapter.lora["model.layers.0.self_attn.v_proj"]
    assert v.b.shape == (32, 4)  # 2 KV heads x 16


def test_classifier_folder_has_head(tmp_path, tiny_bert_dir):
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=3)
    config = LoraConfig(task_type=TaskType.SEQ_CLS, r=4, target_modules=["query", "value"])
    get_peft_model(model, config).save_pretrained(tmp_path / "cls")
    adapter = read_adapter_folder(tmp_path / "cls")
    assert adapter.task == "classification"
    assert adapter.extra["classifier.weight"].shape == (3, 64) and adapter.extra["classifier.bias"].shape == (3,)


def test_pickle_only_folder_is_refused(tmp_path, peft_folder):
    folder = _copy(peft_folder, tmp_path)
    (folder / "adapter_model.safetensors").unlink()
    torch.save({}, folder / "adapter_model.bin")
    with pytest.raises(AdapterFormatError, match="pickle"):
        read_adapter_folder(folder)


@pytest.mark.parametrize("damage,fragment", [
    (lambda f: (f / "adapter_config.json").unlink(), "adapter_config.json is missing"),
    (lambda f: (f / "adapter_config.json").write_text("{nope"), "not valid JSON"),
    (lambda f: (f / "adapter_model.safetensors").write_bytes(b"garbage"), "safetensors"),
])
def test_broken_folders(tmp_path, peft_folder, damage, fragment):
    folder = _copy(peft_folder, tmp_path)
    damage(folder)
    with pytest.raises(AdapterFormatError, match=fragment):
        read_adapter_folder(folder)


def _edit_tensors(folder: Path, edit) -> None:
    path = folder / "adapter_model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


def test_nan_inf_rank_and_pairing_are_checked(tmp_path, peft_folder):
    nan = _copy(peft_folder, tmp_path / "nan")
    _edit_tensors(nan, lambda t: t[sorted(t)[0]].__setitem__((0, 0), float("inf")))
    with pytest.raises(AdapterFormatError, match="NaN or Inf"):
        read_adapter_folder(nan)
    rank = _copy(peft_folder, tmp_path / "rank")
    config = json.loads((rank / "adapter_config.json").read_text())
    (rank / "adapter_config.json").write_text(json.dumps({**config, "r": 8}))
    with pytest.raises(AdapterFormatError, match="rank"):
        read_adapter_folder(rank)
    lonely = _copy(peft_folder, tmp_path / "lonely")
    _edit_tensors(lonely, lambda t: t.pop(next(k for k in sorted(t) if "lora_B" in k)))
    with pytest.raises(AdapterFormatError, match="only one of"):
        read_adapter_folder(lonely)


def test_manifest_round_trip_and_hash_check(tmp_path, peft_folder):
    folder = _copy(peft_folder, tmp_path)
    written = write_manifest(folder, Manifest(task="completion", base_name="tiny", base_fingerprint="abc",
                                              labels=("x",), metrics={"loss": 1.0}))
    assert read_manifest(folder) == written
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(written.files)
    assert "manifest.json" not in written.files
    assert read_adapter_folder(folder).manifest.metrics == {"loss": 1.0}
    _edit_tensors(folder, lambda t: t[sorted(t)[0]].mul_(2))
    with pytest.raises(AdapterFormatError, match="hash"):
        read_adapter_folder(folder)
    with pytest.raises(AdapterFormatError):
        Manifest(task="translation", base_name="x", base_fingerprint="y")


def test_validation_against_bases(tmp_path, peft_folder, tiny_llama_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    signature = BaseSignature.of(model, "tiny", fingerprint_base_folder(tiny_llama_dir))
    adapter = read_adapter_folder(peft_folder)
    validate_against_base(adapter, signature)

    folder = _copy(peft_folder, tmp_path / "other-base")
    write_manifest(folder, Manifest(task="completion", base_name="another-base", base_fingerprint="0123456789abcdef"))
    with pytest.raises(AdapterMismatchError, match="another-base"):
        validate_against_base(read_adapter_folder(folder), signature)

    wide_dir = tmp_path / "wide"
    LlamaForCausalLM(LlamaConfig(vocab_size=500, hidden_size=96, intermediate_size=64, num_hidden_layers=3,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(wide_dir)
    wide = read_adapter_folder(_peft_folder(wide_dir, tmp_path / "wide-adapter"))
    with pytest.raises(AdapterMismatchError, match="q_proj|layers.2"):
        validate_against_base(wide, signature)
    mlp = read_adapter_folder(_peft_folder(tiny_llama_dir, tmp_path / "mlp", target_modules=["up_proj"]))
    stripped = BaseSignature("tiny", signature.fingerprint,
                             {k: v for k, v in signature.linear_shapes.items() if "up_proj" not in k}, 64)
    with pytest.raises(AdapterMismatchError, match="does not have"):
        validate_against_base(mlp, stripped)
