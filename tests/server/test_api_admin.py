"""Admin routes: token required; adapters hot-added and removed while serving; bad adapters refused."""

from __future__ import annotations

import shutil
import stat
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

from server.api.app import create_app
from server.auth import token_path
from server.config import ServerConfig
from tests.server.conftest import ADMIN, make_causal_adapter


@pytest.fixture
def adapter_dir(tmp_path: Path, tiny_adapters: dict[str, Path]) -> Path:
    """A folder of our own holding copies of alpha and beta: inside the default adapter roots of a server
    started with `--adapter alpha=<it>/alpha` (the parents of the start-up adapters)."""
    root = tmp_path / "adapters"
    for name, source in tiny_adapters.items():
        shutil.copytree(source, root / name)
    return root


@pytest.fixture
def admin_client(tmp_path: Path, tiny_llama_base, adapter_dir: Path):
    config = ServerConfig(
        base=str(tiny_llama_base.prepared.path), served_name="tiny", adapters={"alpha": str(adapter_dir / "alpha")},
        state_dir=tmp_path / "state", admin_token="test-token", max_model_len=256, max_tokens_limit=64,
    )
    with TestClient(create_app(config, base=tiny_llama_base)) as client:
        yield client


def _add(client, name, path, **extra):
    return client.post("/admin/adapters", headers=ADMIN, json={"name": name, "path": str(path), **extra})


def _models(client) -> list[str]:
    return [m["id"] for m in client.get("/v1/models").json()["data"]]


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


def test_bad_adapters_are_refused_with_reasons(admin_client, adapter_dir, tiny_llama_dir):
    llama_client, tmp_path = admin_client, adapter_dir  # every folder below is inside the adapter roots

    def add(name, path):
        return _add(llama_client, name, path)

    assert add("../evil", adapter_dir / "beta").status_code == 400
    assert add("a/b", adapter_dir / "beta").status_code == 400
    missing = add("ghost", tmp_path / "nowhere")
    assert missing.status_code == 400 and "not a directory" in missing.json()["error"]["message"]

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_text((adapter_dir / "alpha" / "adapter_config.json").read_text())
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
    (nan_dir / "adapter_config.json").write_text((adapter_dir / "alpha" / "adapter_config.json").read_text())
    tensors = load_file(adapter_dir / "alpha" / "adapter_model.safetensors")
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


def test_an_adapter_may_not_take_the_base_models_name(admin_client, adapter_dir, tiny_llama_base):
    for name in ("tiny", tiny_llama_base.prepared.name):  # the served name, and the base's own
        refused = _add(admin_client, name, adapter_dir / "beta")
        assert refused.status_code == 400, refused.text
        assert "base model's own name" in refused.json()["error"]["message"]
    long = _add(admin_client, "x" * 65, adapter_dir / "beta")
    assert long.status_code == 400 and "64" in long.json()["error"]["message"]
    assert _models(admin_client) == ["tiny", "alpha"]
    base_answer = admin_client.post("/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 2})
    assert base_answer.status_code == 200


def test_paths_outside_the_adapter_roots_are_refused(admin_client, adapter_dir, tmp_path):
    outside = Path(shutil.copytree(adapter_dir / "beta", tmp_path / "elsewhere" / "beta"))
    escape = adapter_dir / "escape"  # inside a root, but a symlink to a folder outside every root
    escape.symlink_to(outside, target_is_directory=True)
    sneaky = adapter_dir / "sneaky"  # a real folder inside a root whose weights link outside
    sneaky.mkdir()
    shutil.copy(adapter_dir / "beta" / "adapter_config.json", sneaky)
    (sneaky / "adapter_model.safetensors").symlink_to(outside / "adapter_model.safetensors")
    for name, path, words in (("outside", outside, "outside the adapter roots"),
                              ("escape", escape, "outside the adapter roots"),
                              ("dotdot", adapter_dir / ".." / "elsewhere" / "beta", "outside the adapter roots"),
                              ("sneaky", sneaky, "symlink that leads outside")):
        refused = _add(admin_client, name, path)
        assert refused.status_code == 400, (name, refused.text)
        message = refused.json()["error"]["message"]
        assert words in message and str(path) in message, name
    assert _models(admin_client) == ["tiny", "alpha"]
    inside = adapter_dir / "inside"  # a symlink that stays inside the roots is fine
    inside.symlink_to(adapter_dir / "beta", target_is_directory=True)
    assert _add(admin_client, "inside", inside).status_code == 200


def test_removed_and_replaced_pinned_adapters_give_their_device_slots_back(tmp_path, tiny_llama_dir, adapter_dir):
    """Regression: a pinned adapter's slot was never freed once it was removed or replaced; with 2 slots,
    two of them made every later adapter fail with "no LoRA slot can be freed"."""
    config = ServerConfig(base=str(tiny_llama_dir), served_name="tiny", adapters={"alpha": str(adapter_dir / "alpha")},
                          state_dir=tmp_path / "state", admin_token="test-token", max_loras=2, max_model_len=128,
                          device="cpu", dtype="float32")

    def complete(model):
        answer = client.post("/v1/completions", json={"model": model, "prompt": "Once", "max_tokens": 2})
        assert answer.status_code == 200, (model, answer.text)

    with TestClient(create_app(config)) as client:
        assert client.app.state.loraplex.base.active.slots.num_slots == 2
        for round_ in range(3):  # each round pins two adapters into both slots, then drops them
            assert _add(client, f"p{round_}", adapter_dir / "alpha", pin=True).status_code == 200
            assert _add(client, f"q{round_}", adapter_dir / "beta", pin=True).status_code == 200
            complete(f"p{round_}")
            complete(f"q{round_}")
            assert client.delete(f"/admin/adapters/p{round_}", headers=ADMIN).status_code == 200
            assert _add(client, f"q{round_}", adapter_dir / "alpha", pin=True, replace=True).status_code == 200
            complete(f"q{round_}")  # the new version of q takes the slot p or the old q left
            assert client.delete(f"/admin/adapters/q{round_}", headers=ADMIN).status_code == 200
        complete("alpha")


def test_configured_roots_and_limits_reach_the_admin_api(tmp_path, tiny_llama_base, adapter_dir):
    """--adapter-root replaces the default roots; --max-lora-rank and --max-adapter-bytes are answered 400
    naming the limit, and nothing is registered."""
    allowed = tmp_path / "allowed"
    shutil.copytree(adapter_dir / "beta", allowed / "beta")
    shutil.copytree(adapter_dir / "alpha", allowed / "alpha")
    beta_bytes = sum(f.stat().st_size for f in (allowed / "beta").iterdir())
    config = ServerConfig(base=str(tiny_llama_base.prepared.path), served_name="tiny", admin_token="test-token",
                          state_dir=tmp_path / "state", adapters={"alpha": str(adapter_dir / "alpha")},
                          adapter_roots=[allowed], max_lora_rank=4, max_adapter_bytes=beta_bytes)
    with TestClient(create_app(config, base=tiny_llama_base)) as client:
        sibling = _add(client, "sibling", adapter_dir / "beta")  # the --adapter's folder is no root now
        assert sibling.status_code == 400 and "outside the adapter roots" in sibling.json()["error"]["message"]
        rank = _add(client, "wide", allowed / "beta")
        assert rank.status_code == 400 and "max_lora_rank" in rank.json()["error"]["message"]
        (allowed / "alpha" / "README.md").write_text("x" * beta_bytes)
        size = _add(client, "big", allowed / "alpha")
        assert size.status_code == 400 and "max_adapter_bytes" in size.json()["error"]["message"]
        (allowed / "alpha" / "README.md").unlink()
        assert _add(client, "fits", allowed / "alpha").status_code == 200
        assert _models(client) == ["tiny", "alpha", "fits"]
