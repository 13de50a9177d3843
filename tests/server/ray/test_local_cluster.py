"""The ingress, catalog and replicas in process (no Ray): the single server's API and answers, the admin
version rule across two replicas, and the routes the ingress answers itself."""

from __future__ import annotations

import json

import httpx
import pytest
from fastapi.testclient import TestClient

from server.api.app import create_app
from server.api.routes_generate import VERSION_HEADER
from server.config import ServerConfig
from server.ray.replica import REPLICA_HEADER
from tests.server.ray.conftest import ADMIN_TOKEN, LocalCluster, local_ingress, serving

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
VOLATILE = ("id", "created")
REPLICA = REPLICA_HEADER.decode()


def _stable(body: dict) -> dict:
    return {k: v for k, v in body.items() if k not in VOLATILE}


def _stream_text(response: httpx.Response) -> tuple[str, bool]:
    """The concatenated text of an SSE answer, and whether it ended with [DONE]."""
    text, done = "", False
    for line in response.iter_lines():
        if not line.startswith("data: "):
            continue
        if line == "data: [DONE]":
            done = True
            continue
        for choice in json.loads(line[6:]).get("choices", []):
            text += choice.get("text") or (choice.get("delta") or {}).get("content") or ""
    return text, done


REQUESTS = [
    ("/v1/completions", {"model": "alpha", "prompt": "Hello there", "max_tokens": 12, "temperature": 0}),
    ("/v1/completions", {"model": "tiny", "prompt": "Hello there", "max_tokens": 12, "temperature": 0}),
    ("/v1/completions", {"model": "alpha:0.5+alpha-two:0.5", "prompt": "Hi", "max_tokens": 8, "temperature": 0}),
    ("/v1/chat/completions", {"model": "alpha", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8,
                              "temperature": 0, "logprobs": True, "top_logprobs": 2}),
    ("/v1/completions", {"model": "nobody", "prompt": "Hi", "max_tokens": 4}),
    ("/v1/completions", {"model": "alpha:x", "prompt": "Hi", "max_tokens": 4}),
    ("/v1/completions", {"model": "alpha", "prompt": "Hi", "max_tokens": 4, "min_p": 0.1}),
]


@pytest.fixture
def two_adapter_config(tiny_config: ServerConfig, tiny_adapters) -> ServerConfig:
    adapters = {"alpha": str(tiny_adapters["alpha"]), "alpha-two": str(tiny_adapters["alpha"])}
    return tiny_config.model_copy(update={"adapters": adapters})


def test_the_ingress_answers_as_the_single_server(two_adapter_config, tiny_llama_base):
    cluster = LocalCluster(two_adapter_config, replicas=2)
    with TestClient(create_app(two_adapter_config, base=tiny_llama_base)) as single, \
            serving(local_ingress(two_adapter_config, cluster)) as url, httpx.Client(base_url=url, timeout=60) as ingress:
        assert cluster.startup_failures == []
        for path, body in REQUESTS:
            want, got = single.post(path, json=body), ingress.post(path, json=body)
            assert got.status_code == want.status_code, (body, got.text)
            assert _stable(got.json()) == _stable(want.json()), body
            if want.status_code == 200 and body["model"] != "tiny":
                assert got.headers[VERSION_HEADER] and REPLICA in got.headers
            if want.status_code == 200:
                with ingress.stream("POST", path, json={**body, "stream": True}) as streamed:
                    text, done = _stream_text(streamed)
                choice = want.json()["choices"][0]
                assert done and text == choice.get("text", (choice.get("message") or {}).get("content")), body
        models = ingress.get("/v1/models").json()["data"]
        assert [m["id"] for m in models] == [m["id"] for m in single.get("/v1/models").json()["data"]]
        assert ingress.get("/health").status_code == 200 and ingress.get("/ready").status_code == 200


def test_admin_through_the_ingress_reaches_every_replica(tiny_config, tiny_adapters, tmp_path):
    cluster = LocalCluster(tiny_config, replicas=2, journal=tmp_path / "journal")
    prompt = {"prompt": "Once upon", "max_tokens": 10, "temperature": 0}

    def on_each_replica(client: httpx.Client, model: str) -> list[httpx.Response]:
        answers = []
        for index in range(2):
            cluster.pin = index
            answers.append(client.post("/v1/completions", json={"model": model, **prompt}))
        cluster.pin = None
        assert [a.headers.get(REPLICA) for a in answers] == ["r0", "r1"]
        return answers

    with serving(local_ingress(tiny_config, cluster)) as url, httpx.Client(base_url=url, timeout=60) as client:
        assert client.post("/admin/adapters", json={"name": "beta", "path": str(tiny_adapters["beta"])}).status_code == 401
        added = client.post("/admin/adapters", headers=ADMIN, json={"name": "beta", "path": str(tiny_adapters["beta"])})
        assert added.status_code == 200, added.text
        first = added.json()["version"]
        answers = on_each_replica(client, "beta")
        assert {a.headers[VERSION_HEADER] for a in answers} == {str(first)}
        assert answers[0].json()["choices"] == answers[1].json()["choices"]
        beta_text = answers[0].json()["choices"][0]["text"]

        again = client.post("/admin/adapters", headers=ADMIN, json={"name": "beta", "path": str(tiny_adapters["beta"])})
        assert again.status_code == 409 and "already exists" in again.json()["error"]["message"]
        outside = client.post("/v1/load_lora_adapter", headers=ADMIN, json={"lora_name": "x", "lora_path": "/etc"})
        assert outside.status_code == 400 and "outside the adapter roots" in outside.json()["error"]["message"]

        replaced = client.post("/admin/adapters", headers=ADMIN,
                               json={"name": "beta", "path": str(tiny_adapters["alpha"]), "replace": True})
        assert replaced.status_code == 200 and replaced.json()["version"] > first
        answers = on_each_replica(client, "beta")
        assert {a.headers[VERSION_HEADER] for a in answers} == {str(replaced.json()["version"])}
        alpha_text = client.post("/v1/completions", json={"model": "alpha", **prompt}).json()["choices"][0]["text"]
        assert [a.json()["choices"][0]["text"] for a in answers] == [alpha_text, alpha_text] != [beta_text] * 2
        assert all(r.adapters.held["beta"].version == replaced.json()["version"] for r in cluster.members)

        listed = client.get("/admin/adapters", headers=ADMIN).json()
        assert {a["name"]: a["version"] for a in listed}["beta"] == replaced.json()["version"]
        assert client.delete("/admin/adapters/beta", headers=ADMIN).status_code == 200
        assert [a.status_code for a in on_each_replica(client, "beta")] == [404, 404]
        assert all("beta" not in r.adapters.held for r in cluster.members)
        assert client.delete("/admin/adapters/beta", headers=ADMIN).status_code == 404
        assert "beta" not in [m["id"] for m in client.get("/v1/models").json()["data"]]


def test_the_journal_brings_runtime_adds_back(tiny_config, tiny_adapters, tmp_path):
    journal = tmp_path / "journal"
    body = {"name": "beta", "path": str(tiny_adapters["beta"])}
    with serving(local_ingress(tiny_config, LocalCluster(tiny_config, 1, journal))) as url:
        version = httpx.post(f"{url}/admin/adapters", headers=ADMIN, json=body, timeout=60).json()["version"]
    with serving(local_ingress(tiny_config, LocalCluster(tiny_config, 1, journal))) as url:
        listed = {a["name"]: a for a in httpx.get(f"{url}/admin/adapters", headers=ADMIN).json()}
        assert listed["beta"]["version"] == version and listed["beta"]["task"] == "completion"
        answer = httpx.post(f"{url}/v1/completions", json={"model": "beta", "prompt": "Hi", "max_tokens": 2}, timeout=60)
        assert answer.status_code == 200 and answer.headers[VERSION_HEADER] == str(version)


def test_routes_the_ingress_answers_itself(tiny_config):
    with serving(local_ingress(tiny_config, LocalCluster(tiny_config, 2))) as url:
        targets = httpx.get(f"{url}/metrics/targets").json()
        assert [t["labels"]["replica"] for t in targets] == ["r0", "r1"]
        assert targets[0]["targets"] == ["127.0.0.1:9600"]
        metrics = httpx.get(f"{url}/metrics")
        assert metrics.status_code == 404 and "/metrics/targets" in metrics.json()["error"]["message"]
        too_big = httpx.post(f"{url}/v1/completions", content=b"x" * (tiny_config.max_request_bytes + 1))
        assert too_big.status_code == 413


def test_classification_through_the_ingress(tmp_path, tiny_bert_dir, tiny_bert_base, tiny_classifiers):
    config = ServerConfig(base=str(tiny_bert_dir), served_name="tiny-bert", admin_token=ADMIN_TOKEN, port=0,
                          adapters={name: str(path) for name, path in tiny_classifiers.items()},
                          state_dir=tmp_path / "state", log_level="warning")
    body = {"model": "three", "input": ["a fine film", "a dull one"]}
    embed = {"model": "tiny-bert", "input": ["a fine film"]}
    with TestClient(create_app(config, base=tiny_bert_base)) as single, \
            serving(local_ingress(config, LocalCluster(config, 2))) as url:
        for path, request in (("/v1/classify", body), ("/v1/embeddings", embed)):
            want, got = single.post(path, json=request), httpx.post(f"{url}{path}", json=request, timeout=60)
            assert got.status_code == want.status_code == 200
            assert _stable(got.json()) == _stable(want.json())
