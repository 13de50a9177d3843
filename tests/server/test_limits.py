"""Limits, each with its setting and a clear 4xx (or 504): body size, inputs and queue of /v1/classify,
the per-request timeout (and that a timed-out request's slot is reused)."""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from server.api.app import create_app
from server.api.body_limit import BodySizeLimit
from server.config import ServerConfig
from server.engine.classify_batcher import ClassifyBatcher, ClassifyJob
from server.engine.worker import QueueFullError, RequestTimedOut
from tests.server.conftest import WAIT_S

LONG_BODY = {"model": "tiny", "prompt": "Hello", "max_tokens": 64, "ignore_eos": True}


def llama_config(tmp_path: Path, base, **options) -> ServerConfig:
    return ServerConfig(base=str(base.prepared.path), served_name="tiny", state_dir=tmp_path / "state",
                        admin_token="test-token", max_model_len=256, max_tokens_limit=64, **options)


def bert_config(tmp_path: Path, base, classifiers, **options) -> ServerConfig:
    return ServerConfig(base=str(base.prepared.path), served_name="tiny-bert", state_dir=tmp_path / "state",
                        adapters={name: str(path) for name, path in classifiers.items()}, admin_token="test-token",
                        **options)


# -- request body size ----------------------------------------------------------------------------

def test_body_over_the_limit_is_413_before_parsing(tmp_path, tiny_llama_base):
    with TestClient(create_app(llama_config(tmp_path, tiny_llama_base, max_request_bytes=1000),
                               base=tiny_llama_base)) as client:
        big = client.post("/v1/completions", json={**LONG_BODY, "prompt": "x" * 2000})
        assert big.status_code == 413
        assert "max_request_bytes" in big.json()["error"]["message"]
        not_json = client.post("/v1/completions", content=b"{" * 2000, headers={"content-type": "application/json"})
        assert not_json.status_code == 413  # refused on size, not parsed (that would be a 400)
        streamed = client.post("/v1/completions", content=iter([b"{" * 600, b"{" * 600]))  # chunked: no length
        assert streamed.status_code == 413
        small = client.post("/v1/completions", json={**LONG_BODY, "max_tokens": 2})
        assert small.status_code == 200, small.text


def _run_asgi(app, messages: list[dict], headers: list[tuple[bytes, bytes]]) -> tuple[list[dict], int]:
    """Drive an ASGI app with these request messages; what it sent and how many messages it read."""
    sent: list[dict] = []
    read = 0

    async def receive():
        nonlocal read
        read += 1
        return messages[read - 1] if read <= len(messages) else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/", "headers": headers, "query_string": b""}
    asyncio.run(app(scope, receive, send))
    return sent, read


def test_a_chunked_body_is_counted_as_it_streams():
    """The cap trips on the chunk that passes it: later chunks are never read, the app is never called."""
    called = []

    async def app(scope, receive, send):
        called.append(True)

    chunks = [{"type": "http.request", "body": b"x" * 400, "more_body": True} for _ in range(10)]
    sent, read = _run_asgi(BodySizeLimit(app, max_bytes=1000), chunks, [])
    assert not called and read == 3  # 400, 800, 1200 > 1000
    assert sent[0]["status"] == 413
    body = json.loads(sent[1]["body"])
    assert "max_request_bytes" in body["error"]["message"]


def test_the_app_reads_the_body_it_was_sent():
    got = []

    async def app(scope, receive, send):
        while True:
            message = await receive()
            got.append(message.get("body", b""))
            if not message.get("more_body"):
                break

    chunks = [{"type": "http.request", "body": b"ab", "more_body": True},
              {"type": "http.request", "body": b"cd", "more_body": False}]
    _run_asgi(BodySizeLimit(app, max_bytes=4), chunks, [(b"content-length", b"4")])
    assert b"".join(got) == b"abcd"


def test_a_declared_length_over_the_cap_is_refused_unread():
    async def app(scope, receive, send):
        raise AssertionError("not reached")

    sent, read = _run_asgi(BodySizeLimit(app, max_bytes=10), [], [(b"content-length", b"11")])
    assert read == 0 and sent[0]["status"] == 413


# -- /v1/classify ---------------------------------------------------------------------------------

def test_too_many_classify_inputs_names_the_setting(tmp_path, tiny_bert_base, tiny_classifiers):
    config = bert_config(tmp_path, tiny_bert_base, tiny_classifiers, max_classify_batch=2)
    with TestClient(create_app(config, base=tiny_bert_base)) as client:
        response = client.post("/v1/classify", json={"model": "two", "input": ["a", "b", "c"]})
        assert response.status_code == 400
        assert "max_classify_batch" in response.json()["error"]["message"]


def test_full_classify_queue_is_429_with_retry_after(tmp_path, tiny_bert_base, tiny_classifiers):
    """With the model busy (its lock held) one job waits on the lock and one in the queue: of three
    requests at least one finds the queue (max_classify_waiting=1) full. Regression: it was unbounded."""
    config = bert_config(tmp_path, tiny_bert_base, tiny_classifiers, max_classify_batch=1, max_classify_waiting=1)
    with TestClient(create_app(config, base=tiny_bert_base)) as client:
        classifier = client.app.state.loraplex.classifier
        responses: list = []
        refused = threading.Event()

        def send() -> None:
            response = client.post("/v1/classify", json={"model": "two", "input": "great"})
            responses.append(response)
            if response.status_code == 429:
                refused.set()

        with classifier.model_lock:  # the batcher blocks on it with at most one job taken
            threads = [threading.Thread(target=send) for _ in range(3)]
            for thread in threads:
                thread.start()
            assert refused.wait(WAIT_S)
        for thread in threads:
            thread.join(WAIT_S)
        statuses = sorted(r.status_code for r in responses)
        assert statuses[0] == 200 and statuses[-1] == 429 and set(statuses) <= {200, 429}
        too_many = next(r for r in responses if r.status_code == 429)
        assert too_many.headers["retry-after"] and "busy" in too_many.json()["error"]["message"]


def test_classify_batcher_bounds_its_queue_and_expires_queued_jobs(tiny_bert_base):
    now = [0.0]
    batcher = ClassifyBatcher(tiny_bert_base, threading.Lock(), 8, 32, max_waiting=2, request_timeout=5,
                              clock=lambda: now[0])
    outcomes: list = []
    for _ in range(2):
        batcher.submit(ClassifyJob(["x"], None, outcomes.append))
    with pytest.raises(QueueFullError):
        batcher.submit(ClassifyJob(["x"], None, outcomes.append))
    now[0] = 100  # both queued jobs are past their deadline before the thread takes them
    batcher.start()
    try:
        for _ in range(int(WAIT_S / 0.01)):
            if len(outcomes) == 2:
                break
            threading.Event().wait(0.01)
        assert len(outcomes) == 2 and all(isinstance(o, RequestTimedOut) for o in outcomes)
    finally:
        batcher.stop()


# -- the per-request timeout ------------------------------------------------------------------------

def test_request_timeout_is_504_and_the_slot_is_reused(tmp_path, tiny_llama_base):
    """A 1 ms timeout: 64 decode steps always take longer. After it, with one slot only, a request without
    the timeout runs: the timed-out request's slot and KV were freed."""
    config = llama_config(tmp_path, tiny_llama_base, request_timeout=0.001, max_num_seqs=1)
    with TestClient(create_app(config, base=tiny_llama_base)) as client:
        plain = client.post("/v1/completions", json=LONG_BODY)
        assert plain.status_code == 504
        assert "request timeout" in plain.json()["error"]["message"]
        with client.stream("POST", "/v1/completions", json={**LONG_BODY, "stream": True}) as stream:
            events = [line for line in stream.iter_lines() if line.startswith("data: ")]
        error = json.loads(events[-1].removeprefix("data: "))["error"]
        assert error["code"] == 504 and error["type"] == "timeout_error"
        scheduler = client.app.state.loraplex.scheduler
        scheduler.request_timeout = 0
        after = client.post("/v1/completions", json={**LONG_BODY, "max_tokens": 8})
        assert after.status_code == 200, after.text
        assert after.json()["usage"]["completion_tokens"] == 8
        assert scheduler.stats.running == 0
