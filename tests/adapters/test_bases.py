"""Base fingerprints and `--base NAME|PATH` resolution."""

from __future__ import annotations

import json
import shutil

import pytest
from safetensors.torch import load_file, save_file

from adapters import EMBEDDED_BASES, BaseNotFoundError, resolve_base
from adapters.fingerprint import FINGERPRINT_LENGTH, fingerprint_base_folder


@pytest.fixture
def base_copy(tmp_path, tiny_llama_dir):
    return shutil.copytree(tiny_llama_dir, tmp_path / "copy")


def test_fingerprint_is_stable_and_depends_on_content_not_location(base_copy, tiny_llama_dir):
    first = fingerprint_base_folder(tiny_llama_dir)
    assert len(first) == FINGERPRINT_LENGTH and int(first, 16) >= 0
    assert fingerprint_base_folder(tiny_llama_dir) == first
    assert fingerprint_base_folder(base_copy) == first


def test_fingerprint_changes_when_a_weight_changes(base_copy, tiny_llama_dir):
    tensors = load_file(base_copy / "model.safetensors")
    name = "model.layers.1.self_attn.q_proj.weight"
    tensors[name][0, 0] += 1.0
    save_file(tensors, base_copy / "model.safetensors", metadata={"format": "pt"})
    assert fingerprint_base_folder(base_copy) != fingerprint_base_folder(tiny_llama_dir)


def test_fingerprint_changes_with_the_architecture(base_copy, tiny_llama_dir):
    config = json.loads((base_copy / "config.json").read_text())
    (base_copy / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
    assert fingerprint_base_folder(base_copy) != fingerprint_base_folder(tiny_llama_dir)


def test_fingerprint_needs_safetensors(tmp_path):
    with pytest.raises(FileNotFoundError, match="safetensors"):
        fingerprint_base_folder(tmp_path)


def test_resolve_base_on_a_local_folder(tmp_path, tiny_llama_dir):
    base = resolve_base(str(tiny_llama_dir), tmp_path / "cache")
    assert base.path == tiny_llama_dir and base.name == tiny_llama_dir.name
    assert base.fingerprint == fingerprint_base_folder(tiny_llama_dir)
    assert not (tmp_path / "cache").exists()  # a ready HF folder is used in place, not copied


@pytest.mark.parametrize("name", ["no-such-model", "HuggingFaceTB/SmolLM2-135M", "./missing-dir"])
def test_unknown_base_says_what_would_work(tmp_path, name):
    with pytest.raises(BaseNotFoundError) as err:
        resolve_base(name, tmp_path)
    message = str(err.value)
    assert repr(name) in message
    assert all(embedded in message for embedded in EMBEDDED_BASES)
    assert "config.json" in message and ".gguf" in message


def test_a_folder_without_config_is_not_a_base(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(BaseNotFoundError):
        resolve_base(str(tmp_path / "empty"), tmp_path)


@pytest.mark.integration
def test_prepared_smollm2_tokenizer_follows_gguf_metadata(smollm2_base):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_base.path)
    assert tokenizer.bos_token_id is not None
    assert tokenizer("Hello")["input_ids"][0] != tokenizer.bos_token_id
    assert tokenizer.eos_token == "<|im_end|>"
