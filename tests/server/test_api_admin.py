"""Admin routes: token required; adapters hot-added and removed while serving; bad adapters refused."""

from __future__ import annotations

import stat

import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

from server.auth import token_path
from tests.server.conftest import ADMIN, make_causal_adapter


def test_admin_requires_the_token(llama_client, tiny_adapters):
    body = {"lora_name": "beta", "lora_path": str(tiny_adapters["beta"])}
    assert llama_client.post("/v1/load_lora_adapter", json=body).status_code == 401
    wrong = {"Authorization": "Bearer nope"}
    assert llama_client.post("/v1/load_lora_adapter", json=body, headers=wrong).status_code == 401
    assert llama_client.get("/admin/adapters").status_code == 401
    assert llama_client.get("/admin/adapters", headers=ADMIN).status_code == 200


def test_hot_add_serves_next_request_then_remove(llama_client, tiny_adapters):
    body = {"model": "beta", "prompt": "Once upon a time", "max_tokens": 4, "temperature": 0}
    assert llama_client.post("/v1/completions", json=body).status_code == 404
    added = llama_client.post("/v1/load_lora_adapter", headers=ADMIN,
                              json={"lora_name": "beta", "lora_path": str(tiny_adapters["beta"])})
    assert added.status_code == 200, added.text
    assert "beta" in [m["id"] for m in llama_client.get("/v1/models").json()["data"]]
    assert llama_client.post("/v1/completions", json=body).status_code == 200
    again = llama_client.post("/v1/load_lora_adapter", headers=ADMIN,
                              json={"lora_name": "beta", "lora_path": str(tiny_adapters["beta"])})
    assert again.status_code == 409
    removed = llama_client.post("/v1/unload_lora_adapter", headers=ADMIN, json={"lora_name": "beta"})
    assert removed.status_code == 200
    assert llama_client.post("/v1/completions", json=body).status_code == 404
    assert llama_client.post("/v1/unload_lora_adapter", headers=ADMIN, json={"lora_name": "beta"}).status_code == 404


def test_replace_bumps_the_version(llama_client, tiny_adapters):
    first = llama_client.post("/admin/adapters", headers=ADMIN, json={"name": "alpha", "path": str(tiny_adapters["beta"]),
                                                                      "replace": True})
    assert first.status_code == 200, first.text
    assert first.json()["rank"] == 8 and first.json()["version"] > 1


def test_bad_adapters_are_refused_with_reasons(llama_client, tiny_adapters, tmp_path, tiny_llama_dir):
    def add(name, path):
        return llama_client.post("/admin/adapters", headers=ADMIN, json={"name": name, "path": str(path)})

    assert add("../evil", tiny_adapters["beta"]).status_code == 400
    assert add("a/b", tiny_adapters["beta"]).status_code == 400
    missing = add("ghost", tmp_path / "nowhere")
    assert missing.status_code == 400 and "not a directory" in missing.json()["error"]["message"]

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_text((tiny_adapters["alpha"] / "adapter_config.json").read_text())
    torch.save({"x": torch.zeros(1)}, pickled / "adapter_model.bin")
    refused = add("pickled", pickled)
    assert refused.status_code == 400 and "pickle" in refused.json()["error"]["message"]

    other_dir = tmp_path / "wide-llama"
    wide = LlamaConfig(vocab_size=1000, hidden_size=96, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2)
    LlamaForCausalLM(wide).save_pretrained(other_dir)
    mismatch = add("wide", make_causal_adapter(other_dir, tmp_path / "wide-adapter", 0, 4, ["q_proj"]))
    assert mismatch.status_code == 400
    assert "q_proj" in mismatch.json()["error"]["message"]

    nan_dir = tmp_path / "nan"
    nan_dir.mkdir()
    (nan_dir / "adapter_config.json").write_text((tiny_adapters["alpha"] / "adapter_config.json").read_text())
    tensors = load_file(tiny_adapters["alpha"] / "adapter_model.safetensors")
    first_key = sorted(tensors)[0]
    tensors[first_key][0, 0] = float("nan")
    save_file(tensors, nan_dir / "adapter_model.safetensors")
    nan = add("nan", nan_dir)
    assert nan.status_code == 400 and "NaN" in nan.json()["error"]["message"]

    names = [m["id"] for m in llama_client.get("/v1/models").json()["data"]]
    assert names == ["tiny", "alpha"]
    ok = llama_client.post("/v1/completions", json={"model": "alpha", "prompt": "hi", "max_tokens": 2})
    assert ok.status_code == 200


def test_generated_token_file_is_private(tmp_path, tiny_llama_base, caplog):
    from fastapi.testclient import TestClient

    from server.api.app import create_app
    from server.config import ServerConfig

    config = ServerConfig(base="unused", state_dir=tmp_path, admin_token=None, port=8123)
    with caplog.at_level("INFO"), TestClient(create_app(config, base=tiny_llama_base)) as client:
        path = token_path(tmp_path, 8123)
        token = path.read_text().strip()
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert len(token) >= 32
        assert token not in caplog.text
        headers = {"Authorization": f"Bearer {token}"}
        assert client.get("/admin/adapters", headers=headers).status_code == 200
