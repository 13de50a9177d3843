"""The `x-loraplex-adapter-version` header: the adapter version a generation request was admitted with
(loadtest/versions.py checks every load-test answer against it); absent for the base."""

from __future__ import annotations

from server.api.routes_generate import VERSION_HEADER
from tests.server.conftest import ADMIN


def test_version_header_names_the_admitted_version(llama_client, tiny_adapters):
    body = {"model": "alpha", "prompt": "Hello", "max_tokens": 2, "temperature": 0}
    first = llama_client.post("/v1/completions", json=body)
    assert first.status_code == 200 and first.headers[VERSION_HEADER].isdigit()
    replaced = llama_client.post("/admin/adapters", headers=ADMIN,
                                 json={"name": "alpha", "path": str(tiny_adapters["beta"]), "replace": True})
    assert replaced.status_code == 200, replaced.text
    version = str(replaced.json()["version"])
    assert version != first.headers[VERSION_HEADER]
    chat = {"model": "alpha", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "temperature": 0}
    for path, request in (("/v1/completions", body), ("/v1/chat/completions", chat)):
        assert llama_client.post(path, json=request).headers[VERSION_HEADER] == version
        with llama_client.stream("POST", path, json={**request, "stream": True}) as streamed:
            assert streamed.status_code == 200 and streamed.headers[VERSION_HEADER] == version
            streamed.read()
    base = llama_client.post("/v1/completions", json={**body, "model": "tiny"})
    assert base.status_code == 200 and VERSION_HEADER not in base.headers
