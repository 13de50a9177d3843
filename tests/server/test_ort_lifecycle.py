"""`--backend onnxruntime` is restart-safe and hostile-input-safe as the torch backend is: shutdown and the
drain's abort answer 503 (EngineStopped, never a 500), --request-timeout is 504, the classify queue is
bounded (429); runtime adds are confined to the adapter roots, bounded in size and rank, may not take the
base's name, and persist across a restart (in a folder of their own, apart from the torch backend's)."""

from __future__ import annotations

import json
import shutil
import threading
import time
import types
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from server.api.app import create_app
from server.config import ServerConfig
from server.engine.classify_batcher import ClassifyJob
from server.engine.sampling import SamplingParams
from server.engine.scheduler import GenerationRequest
from server.engine.worker import EngineStopped, QueueFullError, RequestTimedOut
from server.ort.classify import OrtClassifier
from server.ort.generate import OrtGenerator
from server.ort.state import PERSIST_SUFFIX
from server.persist import JOURNAL_FILE, runtime_state_dir
from tests.server.conftest import ADMIN, WAIT_S

MAX_TOKENS = 64
BODY = {"model": "chat", "prompt": "Hello", "max_tokens": MAX_TOKENS, "ignore_eos": True}
POLL_S = 0.02


def _config(tmp_path: Path, adapters: dict[str, Path], **extra) -> ServerConfig:
    return ServerConfig(backend="onnxruntime", adapters={k: str(v) for k, v in adapters.items()},
                        state_dir=tmp_path / "state", admin_token="test-token", **extra)


def _llama(tmp_path: Path, tiny_exports, **extra) -> ServerConfig:
    return _config(tmp_path, {"chat": tiny_exports["chat"]}, max_model_len=256, max_tokens_limit=MAX_TOKENS, **extra)


def _wait_until(condition, what: str, timeout: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(POLL_S)


def _count_submissions(worker) -> list[int]:
    """Wraps the instance's submit; the list's length is the number of accepted items."""
    accepted: list[int] = []
    original = worker.submit

    def counting(item) -> None:
        original(item)
        accepted.append(1)

    worker.submit = counting
    return accepted


def _send_in_threads(client, path: str, bodies: list[dict]) -> tuple[list[threading.Thread], dict[int, httpx.Response]]:
    results: dict[int, httpx.Response] = {}

    def send(i: int, body: dict) -> None:
        if body.get("stream"):
            with client.stream("POST", path, json=body) as response:
                response.read()
                results[i] = response
        else:
            results[i] = client.post(path, json=body)

    threads = [threading.Thread(target=send, args=(i, b)) for i, b in enumerate(bodies)]
    for thread in threads:
        thread.start()
    return threads, results


def _last_event(response: httpx.Response) -> dict:
    events = [line.removeprefix("data: ") for line in response.text.splitlines() if line.startswith("data: ")]
    return json.loads(events[-1])


def _assert_503(response: httpx.Response) -> None:
    assert response.status_code == 503, response.text
    assert "shutting down" in response.json()["error"]["message"] and response.headers["retry-after"]


# -- shutdown, drain, timeouts ------------------------------------------------------------------------

def test_generation_unfinished_at_the_shutdown_timeout_is_answered_503(tmp_path, tiny_exports):
    """Running and queued ORT completions, streamed and not, are failed by the drain's abort with 503s."""
    with TestClient(create_app(_llama(tmp_path, tiny_exports, shutdown_timeout=0.05))) as client:
        generator = client.app.state.loraplex.scheduler
        lifecycle = client.app.state.lifecycle
        accepted = _count_submissions(generator)
        bodies = [BODY, {**BODY, "stream": True}, BODY]
        with generator.model_lock:  # nothing can finish before the timeout runs out
            threads, results = _send_in_threads(client, "/v1/completions", bodies)
            _wait_until(lambda: len(accepted) == len(bodies), "the requests to be accepted")
            drained = client.portal.start_task_soon(lifecycle.drain)
            _wait_until(lambda: generator._refusal is not None, "the abort")
        drained.result(WAIT_S)
        for thread in threads:
            thread.join(WAIT_S)
        _assert_503(results[0])
        _assert_503(results[2])
        error = _last_event(results[1])["error"]
        assert error["code"] == 503 and error["type"] == "unavailable_error"
        with pytest.raises(EngineStopped):  # and nothing more is taken
            generator.submit(GenerationRequest([1, 2], SamplingParams(max_tokens=2), object(), lambda _: None))


def test_stopping_answers_running_and_queued_generation_503(tmp_path, tiny_exports):
    """Regression: the worker's stop (the lifespan's, without a drain) failed queued requests with a
    RuntimeError, a 500, and let the running one decode to its end."""
    with TestClient(create_app(_llama(tmp_path, tiny_exports))) as client:
        generator = client.app.state.loraplex.scheduler
        accepted = _count_submissions(generator)
        with generator.model_lock:
            threads, results = _send_in_threads(client, "/v1/completions", [BODY, BODY])
            _wait_until(lambda: len(accepted) == 2, "the requests to be accepted")
            stopper = threading.Thread(target=generator.stop)
            stopper.start()
            _wait_until(lambda: generator._stop, "the stop")
        stopper.join(WAIT_S)
        for thread in threads:
            thread.join(WAIT_S)
        _assert_503(results[0])
        _assert_503(results[1])


def test_classification_at_the_shutdown_timeout_and_at_stop_is_answered_503(tmp_path, tiny_exports):
    config = _config(tmp_path, {"two": tiny_exports["two"]}, shutdown_timeout=0.05, max_classify_batch=1)
    body = {"model": "two", "input": "great"}
    with TestClient(create_app(config)) as client:
        classifier = client.app.state.loraplex.classifier
        lifecycle = client.app.state.lifecycle
        accepted = _count_submissions(classifier)
        with classifier.model_lock:  # one job taken (waiting on the lock), one queued
            threads, results = _send_in_threads(client, "/v1/classify", [body, body])
            _wait_until(lambda: len(accepted) == 2, "the requests to be accepted")
            drained = client.portal.start_task_soon(lifecycle.drain)
            _wait_until(lambda: classifier._refusal is not None, "the abort")
        drained.result(WAIT_S)
        for thread in threads:
            thread.join(WAIT_S)
        _assert_503(results[0])
        _assert_503(results[1])
    stub: Any = types.SimpleNamespace(tokenizer=None)
    stopped = OrtClassifier(stub, threading.Lock(), 8, 32)
    outcomes: list = []
    with stopped.model_lock:
        stopped.start()
        stopped.submit(ClassifyJob(["x"], None, outcomes.append))
        stopped.submit(ClassifyJob(["y"], None, outcomes.append))
        stopper = threading.Thread(target=stopped.stop)
        stopper.start()
        _wait_until(lambda: stopped._stop, "the stop")
    stopper.join(WAIT_S)
    assert len(outcomes) == 2 and all(isinstance(o, EngineStopped) for o in outcomes)
    with pytest.raises(EngineStopped):
        stopped.submit(ClassifyJob(["z"], None, outcomes.append))


def test_request_timeout_is_504_and_the_worker_serves_on(tmp_path, tiny_exports):
    """A 1 ms timeout: 64 decode steps always take longer; the check runs before every forward."""
    with TestClient(create_app(_llama(tmp_path, tiny_exports, request_timeout=0.001))) as client:
        plain = client.post("/v1/completions", json=BODY)
        assert plain.status_code == 504 and "request timeout" in plain.json()["error"]["message"]
        with client.stream("POST", "/v1/completions", json={**BODY, "stream": True}) as stream:
            stream.read()
        error = _last_event(stream)["error"]
        assert error["code"] == 504 and error["type"] == "timeout_error"
        generator = client.app.state.loraplex.scheduler
        generator.request_timeout = 0
        after = client.post("/v1/completions", json={**BODY, "max_tokens": 8})
        assert after.status_code == 200, after.text
        assert after.json()["usage"]["completion_tokens"] == 8
        # the last token is emitted before the worker's own bookkeeping ends: wait for it, not on luck
        deadline = time.monotonic() + 10
        while generator.stats.running and time.monotonic() < deadline:
            time.sleep(0.01)
        assert generator.stats.running == 0
        assert client.app.state.loraplex.classifier.request_timeout == 0.001  # wired to both workers


def test_queued_generation_and_classification_expire_and_the_queues_are_bounded():
    now = [0.0]
    stub: Any = types.SimpleNamespace(tokenizer=None, prepared=types.SimpleNamespace(name="base"))
    generator = OrtGenerator(stub, threading.Lock(), max_waiting=2, max_len=64, request_timeout=5, clock=lambda: now[0])
    classifier = OrtClassifier(stub, threading.Lock(), 8, 32, max_waiting=2, request_timeout=5, clock=lambda: now[0])
    outcomes: list = []
    for _ in range(2):
        generator.submit(GenerationRequest([1], SamplingParams(max_tokens=2), object(), outcomes.append))
        classifier.submit(ClassifyJob(["x"], None, outcomes.append))
    with pytest.raises(QueueFullError):
        generator.submit(GenerationRequest([1], SamplingParams(max_tokens=2), object(), outcomes.append))
    with pytest.raises(QueueFullError):
        classifier.submit(ClassifyJob(["x"], None, outcomes.append))
    now[0] = 100  # every queued item is past its deadline before the threads take them
    generator.start()
    classifier.start()
    try:
        _wait_until(lambda: len(outcomes) == 4, "the four items to expire")
        assert all(isinstance(o, RequestTimedOut) for o in outcomes)
        assert generator.stats.waiting == 0
    finally:
        generator.stop()
        classifier.stop()


def test_full_classify_queue_is_429(tmp_path, tiny_exports):
    config = _config(tmp_path, {"two": tiny_exports["two"]}, max_classify_batch=1, max_classify_waiting=1)
    with TestClient(create_app(config)) as client:
        classifier = client.app.state.loraplex.classifier
        assert classifier.max_waiting == 1
        with classifier.model_lock:  # the worker blocks on it with at most one job taken
            threads, results = _send_in_threads(client, "/v1/classify", [{"model": "two", "input": "great"}] * 3)
            _wait_until(lambda: any(r.status_code == 429 for r in results.values()), "a 429")
        for thread in threads:
            thread.join(WAIT_S)
        statuses = sorted(r.status_code for r in results.values())
        assert statuses[0] == 200 and statuses[-1] == 429 and set(statuses) <= {200, 429}
        too_many = next(r for r in results.values() if r.status_code == 429)
        assert too_many.headers["retry-after"] and "busy" in too_many.json()["error"]["message"]


# -- the registry: roots, limits, reserved names, persistence ------------------------------------------

def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


def _with_rank(source: Path, dest: Path, rank: int) -> Path:
    """A copy of an export whose manifest says the adapter had LoRA rank `rank` (the manifest is not in its
    own file list: the copy still reads)."""
    shutil.copytree(source, dest)
    manifest = json.loads((dest / "export_manifest.json").read_text())
    manifest["adapter_rank"] = rank
    (dest / "export_manifest.json").write_text(json.dumps(manifest))
    return dest


def _add(client, name: str, path: Path):
    return client.post("/admin/adapters", json={"name": name, "path": str(path)}, headers=ADMIN)


def test_admin_adds_are_confined_bounded_and_may_not_take_the_base_name(tmp_path, tiny_exports, tiny_bert_dir):
    root = tmp_path / "root"
    inside = Path(shutil.copytree(tiny_exports["three"], root / "three"))
    elsewhere = Path(shutil.copytree(tiny_exports["three"], tmp_path / "elsewhere" / "three"))
    (root / "link").symlink_to(elsewhere, target_is_directory=True)
    padded = Path(shutil.copytree(tiny_exports["two"], root / "padded"))
    wide = _with_rank(tiny_exports["three"], root / "wide", 8)
    no_rank = _with_rank(tiny_exports["three"], root / "no-rank", 0)
    limit = max(_folder_bytes(f) for f in (tiny_exports["two"], inside, wide, no_rank))
    (padded / "padding.bin").write_bytes(b"\0" * (limit - _folder_bytes(padded) + 1))
    config = _config(tmp_path, {"two": tiny_exports["two"]}, adapter_roots=[root], max_adapter_bytes=limit,
                     max_lora_rank=4)
    with TestClient(create_app(config)) as client:
        refusals = {
            "outside": (elsewhere, "outside the adapter roots"),
            "symlinked": (root / "link", "outside the adapter roots"),
            "startup-parent": (tiny_exports["three"], "outside the adapter roots"),  # --adapter-root replaces it
            "padded": (padded, "max_adapter_bytes"),
            "wide": (wide, "max_lora_rank"),
            tiny_bert_dir.name: (inside, "base model's own name"),  # the base's name (learned from the export)
        }
        for name, (path, words) in refusals.items():
            response = _add(client, name, path)
            assert response.status_code == 400, (name, response.text)
            assert words in response.json()["error"]["message"], (name, response.text)
        for name, path in (("inside", inside), ("no-rank", no_rank)):  # rank 0: the export names none
            assert _add(client, name, path).status_code == 200, name
            assert client.post("/v1/classify", json={"model": name, "input": "ok"}).status_code == 200
        names = sorted(a["name"] for a in client.get("/admin/adapters", headers=ADMIN).json())
        assert names == ["inside", "no-rank", "two"]


def test_default_roots_are_the_start_up_exports_parents_and_the_state_dir(tmp_path, tiny_exports,
                                                                          tiny_export_adapters):
    with TestClient(create_app(_config(tmp_path, {"two": tiny_exports["two"]}))) as client:
        assert _add(client, "three", tiny_exports["three"]).status_code == 200  # beside the start-up export
        outside = _add(client, "adapter", tiny_export_adapters["two"])
        assert outside.status_code == 400 and "outside the adapter roots" in outside.json()["error"]["message"]


def test_runtime_exports_survive_a_restart_in_a_folder_apart_from_the_torch_backends(tmp_path, tiny_exports):
    root = tmp_path / "root"
    source = Path(shutil.copytree(tiny_exports["three"], root / "three"))
    config = _config(tmp_path, {"two": tiny_exports["two"]}, adapter_roots=[root], port=8123)
    body = {"model": "extra", "input": ["a wonderful film", "dull"]}
    with TestClient(create_app(config)) as client:
        assert _add(client, "extra", source).status_code == 200
        first = client.post("/v1/classify", json=body).json()["data"]
        fingerprint = client.app.state.loraplex.base.fingerprint
    torch_folder = runtime_state_dir(config.state_dir, 8123, fingerprint)
    folder = torch_folder.with_name(torch_folder.name + PERSIST_SUFFIX)
    assert (folder / JOURNAL_FILE).is_file() and not torch_folder.exists()
    shutil.rmtree(source)  # the stored copy is what is served
    with TestClient(create_app(config)) as client:
        names = sorted(a["name"] for a in client.get("/admin/adapters", headers=ADMIN).json())
        assert names == ["extra", "two"]
        again = client.post("/v1/classify", json=body)
        assert again.status_code == 200 and again.json()["data"] == first
        assert client.delete("/admin/adapters/extra", headers=ADMIN).status_code == 200
    with TestClient(create_app(config)) as client:
        assert sorted(a["name"] for a in client.get("/admin/adapters", headers=ADMIN).json()) == ["two"]
    with TestClient(create_app(config.model_copy(update={"port": 8124}))) as client:  # another port: its own
        assert client.post("/v1/classify", json=body).status_code == 404
