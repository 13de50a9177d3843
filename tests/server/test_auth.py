"""API keys on the inference routes, the admin token on the admin routes, neither granting the other's;
constant-time comparison of bytes that never fails on odd bytes."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from server.api.app import create_app
from server.auth import bearer_matches, load_api_keys
from server.config import ServerConfig

ADMIN_TOKEN = "admin-secret"
UNICODE_KEY = "clé-ü-ключ"
COMPLETION = {"model": "tiny", "prompt": "Hello", "max_tokens": 2}


def bearer(secret: str | bytes) -> dict[str, bytes]:
    raw = secret if isinstance(secret, bytes) else secret.encode("utf-8")
    return {"Authorization": b"Bearer " + raw}  # bytes: sent as they are, non-ASCII included


def config(tmp_path: Path, base, **options) -> ServerConfig:
    return ServerConfig(base=str(base.prepared.path), served_name="tiny", state_dir=tmp_path / "state",
                        admin_token=ADMIN_TOKEN, max_model_len=256, max_tokens_limit=64, **options)


@pytest.fixture
def keyed_client(tmp_path: Path, tiny_llama_base):
    key_file = tmp_path / "keys"
    key_file.write_text("# rotated monthly\nfile-key-1\n\n  file-key-2  \n")
    cfg = config(tmp_path, tiny_llama_base, api_key=UNICODE_KEY, api_key_file=key_file)
    with TestClient(create_app(cfg, base=tiny_llama_base)) as client:
        yield client


@pytest.mark.parametrize("odd", [b"\xff\xfe", "ключ".encode("utf-8"), "é".encode("latin-1"), b"a\x80b"])
def test_non_ascii_admin_token_is_401_not_500(llama_client, odd):
    """Regression: secrets.compare_digest on a non-ASCII str raised TypeError, answered 500."""
    response = llama_client.get("/admin/adapters", headers=bearer(odd))
    assert response.status_code == 401, response.text
    assert response.headers["www-authenticate"] == "Bearer"


def test_inference_routes_need_an_api_key(keyed_client):
    for headers in ({}, bearer("wrong"), {"Authorization": "Basic Zm9vOmJhcg=="}, bearer(b"\xff"), bearer("")):
        response = keyed_client.post("/v1/completions", json=COMPLETION, headers=headers)
        assert response.status_code == 401, headers
        assert "API key" in response.json()["error"]["message"]
    for key in (UNICODE_KEY, "file-key-1", "file-key-2"):
        response = keyed_client.post("/v1/completions", json=COMPLETION, headers=bearer(key))
        assert response.status_code == 200, (key, response.text)
    assert keyed_client.get("/v1/models").status_code == 401
    assert keyed_client.get("/v1/models", headers=bearer("file-key-1")).status_code == 200
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    assert keyed_client.post("/v1/chat/completions", json=chat).status_code == 401
    assert keyed_client.post("/v1/classify", json={"model": "tiny", "input": "x"}).status_code == 401


def test_the_two_secrets_do_not_stand_in_for_each_other(keyed_client):
    assert keyed_client.post("/v1/completions", json=COMPLETION, headers=bearer(ADMIN_TOKEN)).status_code == 401
    assert keyed_client.get("/admin/adapters", headers=bearer("file-key-1")).status_code == 401
    assert keyed_client.get("/admin/adapters", headers=bearer(ADMIN_TOKEN)).status_code == 200


def test_ops_routes_stay_open(keyed_client):
    for path in ("/health", "/ready", "/metrics"):
        assert keyed_client.get(path).status_code == 200, path


def test_without_keys_inference_is_open(llama_client):
    assert llama_client.post("/v1/completions", json=COMPLETION).status_code == 200


def test_api_key_from_the_environment(monkeypatch, tmp_path, tiny_llama_base):
    monkeypatch.setenv("LORAPLEX_API_KEY", "env-key")
    with TestClient(create_app(config(tmp_path, tiny_llama_base), base=tiny_llama_base)) as client:
        assert client.post("/v1/completions", json=COMPLETION).status_code == 401
        assert client.post("/v1/completions", json=COMPLETION, headers=bearer("env-key")).status_code == 200


def test_unusable_key_files_are_start_up_errors(tmp_path):
    with pytest.raises(ValueError, match="cannot read"):
        load_api_keys(None, tmp_path / "missing")
    (tmp_path / "empty").write_text("# nothing yet\n\n")
    with pytest.raises(ValueError, match="holds no key"):
        load_api_keys(None, tmp_path / "empty")
    (tmp_path / "binary").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ValueError, match="cannot read"):
        load_api_keys(None, tmp_path / "binary")


@pytest.mark.parametrize("header,expected", [
    ("Bearer k", True), ("bearer k", True), ("Bearer  k ", True), ("Bearer k2", False), ("Bearer", False),
    ("Bearer ", False), ("k", False), ("Token k", False), (None, False), ("", False),
    ("Bearer \u043a".encode("utf-8").decode("latin-1"), False),  # as starlette hands over UTF-8 bytes
    ("Bearer \u20ac", False),  # a str latin-1 cannot hold: taken as UTF-8, never an exception
])
def test_bearer_matches(header, expected):
    assert bearer_matches(header, [b"k"]) is expected


def test_bearer_matches_utf8_secrets_as_starlette_decodes_them():
    wire = ("Bearer " + UNICODE_KEY).encode("utf-8").decode("latin-1")  # starlette's decoding of the header
    assert bearer_matches(wire, [UNICODE_KEY.encode("utf-8")])
    assert not bearer_matches(wire, [])
