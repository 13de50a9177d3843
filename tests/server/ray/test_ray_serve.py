"""`server ray-serve` on a local Ray cluster (CPU, loopback): two replicas of smollm2-135m with 8 adapters.

One cluster for the module (its tests run in order; the last one kills a replica). What they show:
greedy outputs through the ingress equal `server serve`'s token for token (fp32); under a bounded load each
adapter is read on at most one replica (the replicas' own metrics); an adapter added through the ingress
serves from both replicas, a replace keeps a running request on its version while new ones get the new
one, a remove is seen by both; a killed replica process loses only the requests that were on it, the other
serves on, and Ray starts a new one.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

pytest.importorskip("ray", reason='Ray Serve is the optional extra: pip install -e ".[ray]" (CI installs it)')

from server.api.routes_generate import VERSION_HEADER  # noqa: E402
from tests.server.ray.processes import (  # noqa: E402
    SERVER_BIN, adapters_loaded, quiet_env, replica_metrics, running,
)
from loadtest.serve import free_port  # noqa: E402

pytestmark = pytest.mark.integration

ADAPTERS = [f"a{i}" for i in range(8)]
PROMPTS = ["The capital of France is", "def fibonacci(n):"]
SHORT, LONG = 12, 96  # tokens: parity requests, and the request a replace runs under
MAX_ONGOING = 4  # per replica: the bounded load below never has more requests in flight than this, in all
STARTUP_S = 420
RESTART_S = 150
REPLICA = "x-loraplex-replica"


@pytest.fixture(scope="module")
def adapter_root(tmp_path_factory, smollm2_base) -> Path:
    """10 random rank-4 LoRA adapters on smollm2-135m (big enough to change its greedy output): a0..a7, and
    `late`/`late2` for the runtime add and replace."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("ray-adapters")
    model = AutoModelForCausalLM.from_pretrained(smollm2_base.path, dtype=torch.float32)
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "up_proj"]))
    for seed, name in enumerate([*ADAPTERS, "late", "late2"]):
        torch.manual_seed(seed)
        with torch.no_grad():
            for key, param in peft.named_parameters():
                if "lora_B" in key:
                    param.normal_(0, 0.2)
        peft.save_pretrained(root / name)
    return root


def _completion(model: str, prompt: str, max_tokens: int, **extra) -> dict:
    return {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "logprobs": 0, **extra}


def _tokens(answer: dict) -> list[str]:
    return answer["choices"][0]["logprobs"]["tokens"]


def _ready(url: str) -> bool:
    return httpx.get(f"{url}/ready", timeout=5).status_code == 200


def _cluster_ready(url: str) -> bool:
    return _ready(url) and len(httpx.get(f"{url}/metrics/targets", timeout=10).json()) == 2


@pytest.fixture(scope="module")
def single(adapter_root, tmp_path_factory) -> dict:
    """`server serve`'s answers (one process, one thread), to compare the cluster's with."""
    tmp = tmp_path_factory.mktemp("single")
    url = f"http://127.0.0.1:{free_port()}"
    cmd = [str(SERVER_BIN), "serve", "--port", url.rsplit(":", 1)[1], "--threads", "1", "--log-level", "warning"]
    for name in [*ADAPTERS, "late", "late2"]:
        cmd += ["--adapter", f"{name}={adapter_root / name}"]
    answers = {}
    with running(cmd, quiet_env(tmp / "state"), tmp / "serve.log", url, _ready, STARTUP_S):
        with httpx.Client(base_url=url, timeout=120) as client:
            for model in ["smollm2-135m", *ADAPTERS, "late", "late2"]:
                for prompt in PROMPTS:
                    answers[model, prompt, SHORT] = client.post("/v1/completions",
                                                                json=_completion(model, prompt, SHORT)).json()
            for model in ("late", "late2"):
                answers[model, PROMPTS[0], LONG] = client.post("/v1/completions",
                                                               json=_completion(model, PROMPTS[0], LONG)).json()
            chat = {"model": "a3", "messages": [{"role": "user", "content": "Hi!"}], "max_tokens": SHORT,
                    "temperature": 0}
            answers["chat"] = client.post("/v1/chat/completions", json=chat).json()
    return answers


@pytest.fixture(scope="module")
def cluster_state(tmp_path_factory) -> Path:
    """The cluster's state dir (LORAPLEX_STATE): its admin token file, its journal."""
    return tmp_path_factory.mktemp("cluster") / "state"


@pytest.fixture(scope="module")
def cluster(adapter_root, single, cluster_state):
    """`server ray-serve --replicas 2` (one thread and one CPU each), the 8 adapters given with --adapter."""
    tmp = cluster_state.parent
    port = free_port()
    env = quiet_env(cluster_state)
    cmd = [str(SERVER_BIN), "ray-serve", "--replicas", "2", "--threads", "1", "--port", str(port),
           "--metrics-port", str(free_port()), "--max-ongoing-requests", str(MAX_ONGOING), "--log-level", "warning",
           "--adapter-root", str(adapter_root)]
    for name in ADAPTERS:
        cmd += ["--adapter", f"{name}={adapter_root / name}"]
    with running(cmd, env, tmp / "ray-serve.log", f"http://127.0.0.1:{port}", _cluster_ready, STARTUP_S) as url:
        token = (cluster_state / f"admin-token-{port}").read_text().strip()
        yield url, {"Authorization": f"Bearer {token}"}


def _post(url: str, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{url}{path}", json=body, timeout=300)


def _stream(url: str, body: dict) -> dict:
    """A streamed completion: its status, replica, version, text, and how it ended."""
    outcome = {"status": None, "replica": None, "version": None, "text": "", "done": False, "error": None}
    try:
        with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}, timeout=300) as response:
            outcome.update(status=response.status_code, replica=response.headers.get(REPLICA),
                           version=response.headers.get(VERSION_HEADER))
            if response.status_code != 200:
                outcome["error"] = response.read().decode()
                return outcome
            for line in response.iter_lines():
                if line == "data: [DONE]":
                    outcome["done"] = True
                elif line.startswith("data: "):
                    event = json.loads(line[6:])
                    if "error" in event:
                        outcome["error"] = event["error"]["message"]
                    else:
                        outcome["text"] += "".join(c["text"] for c in event["choices"])
    except httpx.HTTPError as exc:
        outcome["error"] = f"{type(exc).__name__}: {exc}"
    return outcome


def test_the_serve_config_builder_builds_the_application(tmp_path):
    from ray.serve import Application

    from server.ray.app import build_app

    app = build_app({"base": "smollm2-135m", "port": "8123", "replicas": "2", "state_dir": str(tmp_path)})
    assert isinstance(app, Application) and (tmp_path / "admin-token-8123").is_file()
    with pytest.raises(ValueError, match="unknown argument"):
        build_app({"base": "smollm2-135m", "replica": 2})


def test_greedy_outputs_equal_server_serve(cluster, single):
    url, _ = cluster
    replicas = set()
    for model in ["smollm2-135m", *ADAPTERS]:
        for prompt in PROMPTS:
            answer = _post(url, "/v1/completions", _completion(model, prompt, SHORT))
            assert answer.status_code == 200, answer.text
            want = single[model, prompt, SHORT]
            assert _tokens(answer.json()) == _tokens(want), (model, prompt)
            assert answer.json()["choices"][0]["text"] == want["choices"][0]["text"]
            replicas.add(answer.headers[REPLICA])
    assert len(replicas) == 2  # the adapters' first uses went to the replica holding the fewest
    streamed = _stream(url, _completion("a5", PROMPTS[1], SHORT))
    assert streamed["done"] and streamed["text"] == single["a5", PROMPTS[1], SHORT]["choices"][0]["text"]
    chat = {"model": "a3", "messages": [{"role": "user", "content": "Hi!"}], "max_tokens": SHORT, "temperature": 0}
    got = _post(url, "/v1/chat/completions", chat).json()
    assert got["choices"][0]["message"] == single["chat"]["choices"][0]["message"]
    models = [m["id"] for m in httpx.get(f"{url}/v1/models").json()["data"]]
    assert models == ["smollm2-135m", *ADAPTERS]


def test_each_adapter_is_read_on_one_replica_under_a_bounded_load(cluster):
    """MAX_ONGOING requests in flight at most, in all: no replica is ever oversubscribed, so Ray's multiplexing
    sends every adapter's requests to the one replica that holds it."""
    url, _ = cluster
    bodies = [_completion(ADAPTERS[i % len(ADAPTERS)], PROMPTS[i % 2], 6) for i in range(32)]
    with ThreadPoolExecutor(MAX_ONGOING) as pool:
        answers = list(pool.map(lambda body: _post(url, "/v1/completions", body), bodies))
    assert [a.status_code for a in answers] == [200] * len(bodies)
    loaded = adapters_loaded(replica_metrics(url))
    assert set(loaded) == set(ADAPTERS) and all(len(replicas) == 1 for replicas in loaded.values()), loaded
    assert len(set().union(*loaded.values())) == 2
    served = {}
    for answer, body in zip(answers, bodies):
        served.setdefault(body["model"], set()).add(answer.headers[REPLICA])
    assert served == loaded


def test_an_adapter_added_through_the_ingress_serves_from_both_replicas(cluster, cluster_state, single,
                                                                       adapter_root):
    """Added with the admin CLI (`server add-adapter`, which finds the cluster's token for the ingress's port)."""
    url, _ = cluster
    added = subprocess.run([str(SERVER_BIN), "add-adapter", "late", str(adapter_root / "late"), "--url", url],
                           env=quiet_env(cluster_state), capture_output=True, text=True, timeout=120)
    assert added.returncode == 0, added.stderr
    version = str(json.loads(added.stdout)["version"])
    want = _tokens(single["late", PROMPTS[0], SHORT])
    # More requests at once than one replica takes (MAX_ONGOING): Ray sends the rest to the other replica.
    with ThreadPoolExecutor(3 * MAX_ONGOING) as pool:
        answers = list(pool.map(lambda _: _post(url, "/v1/completions", _completion("late", PROMPTS[0], SHORT)),
                                range(3 * MAX_ONGOING)))
    assert {a.status_code for a in answers} == {200}
    assert {a.headers[VERSION_HEADER] for a in answers} == {version}
    assert all(_tokens(a.json()) == want for a in answers)
    assert len({a.headers[REPLICA] for a in answers}) == 2
    assert len(adapters_loaded(replica_metrics(url))["late"]) == 2
    assert "late" in [m["id"] for m in httpx.get(f"{url}/v1/models").json()["data"]]


def test_a_replace_keeps_running_requests_on_their_version(cluster, single, adapter_root):
    url, admin = cluster
    with ThreadPoolExecutor(1) as pool:
        running_request = pool.submit(_stream, url, _completion("late", PROMPTS[0], LONG))
        time.sleep(2.0)  # it is decoding (96 tokens take several seconds on one thread)
        replaced = httpx.post(f"{url}/admin/adapters", headers=admin, timeout=120,
                              json={"name": "late", "path": str(adapter_root / "late2"), "replace": True})
        assert replaced.status_code == 200, replaced.text
        with ThreadPoolExecutor(2 * MAX_ONGOING) as burst:
            after = list(burst.map(lambda _: _post(url, "/v1/completions", _completion("late", PROMPTS[0], SHORT)),
                                   range(2 * MAX_ONGOING)))
        old = running_request.result()
    assert not running_request.cancelled() and old["done"], old
    assert old["version"] != str(replaced.json()["version"])
    assert old["text"] == single["late", PROMPTS[0], LONG]["choices"][0]["text"]  # the old version to its end
    assert {a.headers[VERSION_HEADER] for a in after} == {str(replaced.json()["version"])}
    assert all(_tokens(a.json()) == _tokens(single["late2", PROMPTS[0], SHORT]) for a in after)


def test_a_remove_is_seen_by_every_replica(cluster):
    url, admin = cluster
    assert httpx.delete(f"{url}/admin/adapters/late", headers=admin, timeout=120).status_code == 200
    with ThreadPoolExecutor(2 * MAX_ONGOING) as pool:
        answers = list(pool.map(lambda _: _post(url, "/v1/completions", _completion("late", PROMPTS[0], 4)),
                                range(2 * MAX_ONGOING)))
    assert {a.status_code for a in answers} == {404}
    for data in replica_metrics(url).values():
        assert ("loraplex_replica_adapters_held", frozenset({("adapter", "late")})) not in data["samples"]


def test_killing_a_replica_loses_only_its_requests(cluster):
    url, _ = cluster
    before = replica_metrics(url)
    victim, other = sorted(before)
    bodies = [_completion(ADAPTERS[i % len(ADAPTERS)], PROMPTS[0], 40) for i in range(16)]
    with ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(_stream, url, body) for body in bodies]
        time.sleep(3.0)  # requests are decoding on both replicas
        os.kill(before[victim]["pid"], signal.SIGKILL)
        killed_at = time.monotonic()
        outcomes = [f.result() for f in futures]
    failed = [o for o in outcomes if not o["done"] or o["error"]]
    assert failed, "the kill hit no request: nothing was shown"
    for outcome in failed:  # on the killed replica (its headers came), or sent to it as it died (503 from the ingress)
        assert outcome["replica"] == victim or (outcome["status"] == 503 and "stopped" in outcome["error"]), outcome
    assert all(o["done"] for o in outcomes if o["replica"] == other)
    # The cluster serves on, and Ray replaces the killed replica.
    for model in ADAPTERS:
        assert _post(url, "/v1/completions", _completion(model, PROMPTS[1], 4)).status_code == 200
    deadline = killed_at + RESTART_S
    while True:
        targets = {t["labels"]["replica"] for t in httpx.get(f"{url}/metrics/targets", timeout=30).json()}
        if len(targets) == 2 and victim not in targets:
            break
        assert time.monotonic() < deadline, f"Ray did not replace replica {victim}: {targets}"
        time.sleep(2.0)
    newcomer = (targets - {other}).pop()
    seen = {_post(url, "/v1/completions", _completion("smollm2-135m", PROMPTS[1], 2)).headers[REPLICA]
            for _ in range(8)}
    assert newcomer in seen
