"""Our manifest (round trip, file hashes) and the check of an adapter against the base it will run on."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, LlamaConfig, LlamaForCausalLM

from adapters import (
    AdapterFormatError, AdapterMismatchError, BaseSignature, Manifest, read_adapter_folder, read_manifest,
    validate_against_base, write_manifest,
)
from adapters.fingerprint import fingerprint_base_folder
from adapters.manifest import MANIFEST_VERSION
from tests.adapters.peft_folders import copy_folder, edit_tensors, save_classifier_adapter, save_peft_adapter

OTHER_FINGERPRINT = "0123456789abcdef"


def _manifest(**overrides) -> Manifest:
    fields = {"task": "completion", "base_name": "tiny", "base_fingerprint": "abc"}
    return Manifest(**{**fields, **overrides})


def test_manifest_round_trip_hashes_every_file_but_itself(tmp_path, peft_folder):
    folder = copy_folder(peft_folder, tmp_path / "a")
    written = write_manifest(folder, _manifest(labels=("neg", "pos"), metrics={"loss": 1.25},
                                               train_config={"seed": 3}))
    assert read_manifest(folder) == written
    assert set(written.files) == {p.name for p in folder.iterdir()} - {"manifest.json"}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(written.files)
    weights = (folder / "adapter_model.safetensors").read_bytes()
    assert written.files["adapter_model.safetensors"] == hashlib.sha256(weights).hexdigest()
    assert written.created_at and written.format_version == MANIFEST_VERSION
    adapter = read_adapter_folder(folder)
    assert adapter.manifest == written and adapter.labels == ("neg", "pos") and adapter.task == "completion"


def test_manifest_task_overrides_peft_task_type(tmp_path, peft_folder):
    folder = copy_folder(peft_folder, tmp_path / "a")
    write_manifest(folder, _manifest(task="classification", labels=("a", "b")))
    assert read_adapter_folder(folder).task == "classification"


def test_edited_weights_fail_the_hash_check(tmp_path, peft_folder):
    folder = copy_folder(peft_folder, tmp_path / "a")
    write_manifest(folder, _manifest())
    edit_tensors(folder, lambda t: t[sorted(t)[0]].mul_(2))
    with pytest.raises(AdapterFormatError, match="'adapter_model.safetensors' does not match its hash"):
        read_adapter_folder(folder)


def test_a_listed_file_that_is_missing_fails(tmp_path, peft_folder):
    folder = copy_folder(peft_folder, tmp_path / "a")
    (folder / "notes.txt").write_text("x")
    write_manifest(folder, _manifest())
    (folder / "notes.txt").unlink()
    with pytest.raises(AdapterFormatError, match="'notes.txt' listed in manifest.json is missing"):
        read_adapter_folder(folder)


@pytest.mark.parametrize("overrides,fragment", [
    ({"task": "translation"}, "task"),
    ({"format_version": MANIFEST_VERSION + 1}, "newer"),
])
def test_bad_manifests_are_refused(overrides, fragment):
    with pytest.raises(AdapterFormatError, match=fragment):
        _manifest(**overrides)


@pytest.mark.parametrize("text,fragment", [
    ("{oops", "not valid JSON"),
    ("[]", "JSON object"),
    (json.dumps({"task": "completion"}), "missing fields"),
    (json.dumps({"task": "poetry", "base_name": "x", "base_fingerprint": "y"}), "task"),
])
def test_unreadable_manifest_files_are_refused(tmp_path, text, fragment):
    (tmp_path / "manifest.json").write_text(text)
    with pytest.raises(AdapterFormatError, match=fragment):
        read_manifest(tmp_path)


def test_unknown_manifest_keys_are_ignored(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps(
        {"task": "completion", "base_name": "x", "base_fingerprint": "y", "from_the_future": 1}))
    assert read_manifest(tmp_path).base_name == "x"


@pytest.fixture(scope="module")
def tiny_signature(tiny_llama_dir) -> BaseSignature:
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    return BaseSignature.of(model, "tiny", fingerprint_base_folder(tiny_llama_dir))


def test_signature_lists_the_linear_layers(tiny_signature):
    assert tiny_signature.hidden_size == 64
    assert tiny_signature.linear_shapes["model.layers.1.self_attn.q_proj"] == (64, 64)
    assert tiny_signature.linear_shapes["model.layers.0.self_attn.v_proj"] == (32, 64)
    assert tiny_signature.linear_shapes["model.layers.0.mlp.down_proj"] == (64, 128)


def test_adapter_made_on_the_base_fits(tmp_path, peft_folder, tiny_signature):
    validate_against_base(read_adapter_folder(peft_folder), tiny_signature)
    folder = copy_folder(peft_folder, tmp_path / "same")
    write_manifest(folder, _manifest(base_fingerprint=tiny_signature.fingerprint))
    validate_against_base(read_adapter_folder(folder), tiny_signature)


def test_wrong_fingerprint_names_both_bases(tmp_path, peft_folder, tiny_signature):
    folder = copy_folder(peft_folder, tmp_path / "other-base")
    write_manifest(folder, _manifest(base_name="another-base", base_fingerprint=OTHER_FINGERPRINT))
    with pytest.raises(AdapterMismatchError) as err:
        validate_against_base(read_adapter_folder(folder), tiny_signature)
    message = str(err.value)
    assert "'another-base'" in message and OTHER_FINGERPRINT in message
    assert "'tiny'" in message and tiny_signature.fingerprint in message


def test_module_the_base_lacks(tmp_path, tiny_llama_dir, tiny_signature):
    mlp = read_adapter_folder(save_peft_adapter(tiny_llama_dir, tmp_path / "mlp", target_modules=["up_proj"]))
    validate_against_base(mlp, tiny_signature)
    stripped = BaseSignature("tiny", tiny_signature.fingerprint,
                             {k: v for k, v in tiny_signature.linear_shapes.items() if "up_proj" not in k}, 64)
    with pytest.raises(AdapterMismatchError, match="does not have: .*up_proj"):
        validate_against_base(mlp, stripped)


def test_adapter_from_a_wider_llama_does_not_fit(tmp_path, tiny_signature):
    wide_dir = tmp_path / "wide"
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=96, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(wide_dir)
    wide = read_adapter_folder(save_peft_adapter(wide_dir, tmp_path / "wide-adapter"))
    assert set(wide.lora) <= set(tiny_signature.linear_shapes)  # same names: only the shapes can catch it
    with pytest.raises(AdapterMismatchError, match="do not fit the base layer"):
        validate_against_base(wide, tiny_signature)


def test_classification_head_must_match_the_hidden_size(tmp_path, tiny_bert_dir):
    save_classifier_adapter(tiny_bert_dir, tmp_path / "cls")
    adapter = read_adapter_folder(tmp_path / "cls")
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=3)
    signature = BaseSignature.of(model, "tiny-bert", fingerprint_base_folder(tiny_bert_dir))
    validate_against_base(adapter, signature)
    narrower = BaseSignature("tiny-bert", signature.fingerprint, signature.linear_shapes, hidden_size=32)
    with pytest.raises(AdapterMismatchError, match="classifier.weight"):
        validate_against_base(adapter, narrower)
