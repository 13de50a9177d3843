"""Graceful shutdown: readiness drops at once, admission stops (503), accepted requests (running and queued)
finish within shutdown_timeout, the rest are answered 503, and `server serve` exits 0 on SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from server.api.app import create_app
from server.config import ServerConfig
from tests.server.conftest import WAIT_S

MAX_TOKENS = 64
BODY = {"model": "tiny", "prompt": "Hello", "max_tokens": MAX_TOKENS, "ignore_eos": True}
SERVE = [sys.executable, "-m", "server.cli", "serve"]
START_S = 300  # a cold start imports torch and transformers on a shared 2-core machine
POLL_S = 0.02


def _config(tmp_path: Path, base, **options) -> ServerConfig:
    return ServerConfig(base=str(base.prepared.path), served_name="tiny", state_dir=tmp_path / "state",
                        admin_token="test-token", max_model_len=256, max_tokens_limit=MAX_TOKENS, max_num_seqs=1,
                        **options)


def _wait_until(condition, what: str, timeout: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(POLL_S)


class Submissions:
    """Counts the requests the scheduler accepted (wraps the instance's submit)."""

    def __init__(self, scheduler) -> None:
        self.count = 0
        original = scheduler.submit

        def counting(request) -> None:
            original(request)
            self.count += 1

        scheduler.submit = counting


def _send_in_threads(client, bodies: list[dict]) -> tuple[list[threading.Thread], dict[int, httpx.Response]]:
    """Each body from its own thread; the streamed ones' full text is read before the response is kept."""
    results: dict[int, httpx.Response] = {}

    def send(i: int, body: dict) -> None:
        if body.get("stream"):
            with client.stream("POST", "/v1/completions", json=body) as response:
                response.read()
                results[i] = response
        else:
            results[i] = client.post("/v1/completions", json=body)

    threads = [threading.Thread(target=send, args=(i, b)) for i, b in enumerate(bodies)]
    for thread in threads:
        thread.start()
    return threads, results


def _sse_events(text: str) -> list[str]:
    return [line.removeprefix("data: ") for line in text.splitlines() if line.startswith("data: ")]


def _assert_complete(response: httpx.Response, streamed: bool) -> None:
    assert response.status_code == 200, response.text
    if streamed:
        events = _sse_events(response.text)
        assert events[-1] == "[DONE]", events[-3:]
        chunks = [json.loads(e) for e in events[:-1]]
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    else:
        body = response.json()
        assert body["choices"][0]["finish_reason"] == "length"
        assert body["usage"]["completion_tokens"] == MAX_TOKENS


def test_drain_serves_running_and_queued_requests_and_refuses_new_ones(tmp_path, tiny_llama_base):
    with TestClient(create_app(_config(tmp_path, tiny_llama_base, shutdown_timeout=WAIT_S),
                               base=tiny_llama_base)) as client:
        state = client.app.state.loraplex
        lifecycle = client.app.state.lifecycle
        submissions = Submissions(state.scheduler)
        bodies = [BODY, {**BODY, "stream": True}, BODY]
        with state.scheduler.model_lock:  # the engine is frozen: one request admitted, two queued
            threads, results = _send_in_threads(client, bodies)
            _wait_until(lambda: submissions.count == len(bodies), "the requests to be accepted")
            drained = client.portal.start_task_soon(lifecycle.drain)
            _wait_until(lambda: lifecycle.draining, "the drain to begin")
            ready = client.get("/ready")
            assert ready.status_code == 503 and ready.json()["status"] == "draining"
            refused = client.post("/v1/completions", json=BODY)
            assert refused.status_code == 503 and refused.headers["retry-after"]
            assert "shutting down" in refused.json()["error"]["message"]
            assert client.get("/health").status_code == 200  # alive, just not taking work
            assert not drained.done()
        drained.result(WAIT_S)
        for thread in threads:
            thread.join(WAIT_S)
        for i, body in enumerate(bodies):
            _assert_complete(results[i], bool(body.get("stream")))


def test_requests_unfinished_at_the_shutdown_timeout_are_answered_503(tmp_path, tiny_llama_base):
    with TestClient(create_app(_config(tmp_path, tiny_llama_base, shutdown_timeout=0.05),
                               base=tiny_llama_base)) as client:
        state = client.app.state.loraplex
        lifecycle = client.app.state.lifecycle
        submissions = Submissions(state.scheduler)
        bodies = [BODY, {**BODY, "stream": True}, BODY]
        with state.scheduler.model_lock:  # nothing can finish before the timeout runs out
            threads, results = _send_in_threads(client, bodies)
            _wait_until(lambda: submissions.count == len(bodies), "the requests to be accepted")
            drained = client.portal.start_task_soon(lifecycle.drain)
            _wait_until(lambda: state.scheduler._refusal is not None, "the abort")
        drained.result(WAIT_S)
        for thread in threads:
            thread.join(WAIT_S)
        for i in (0, 2):
            assert results[i].status_code == 503
            assert "shutting down" in results[i].json()["error"]["message"]
        events = _sse_events(results[1].text)
        error = json.loads(events[-1])["error"]
        assert error["code"] == 503 and error["type"] == "unavailable_error"


# -- a real server process ----------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _prompt_tokens_counted(client: httpx.Client) -> float:
    text = client.get("/metrics").text
    return sum(sample.value for family in text_string_to_metric_families(text)
               if family.name == "loraplex_prompt_tokens" for sample in family.samples
               if sample.name.endswith("_total"))


@pytest.fixture
def server_process(request, tmp_path: Path, tiny_llama_dir: Path):
    """`server serve` on the tiny Llama; `request.param`: its --shutdown-timeout (default 120 s)."""
    shutdown_timeout = getattr(request, "param", 120)
    port = _free_port()
    log = (tmp_path / "server.log").open("w+")
    args = ["--base", str(tiny_llama_dir), "--port", str(port), "--device", "cpu", "--served-name", "tiny",
            "--max-num-seqs", "2", "--max-model-len", "512", "--shutdown-timeout", str(shutdown_timeout),
            "--threads", "1"]
    env = {**os.environ, "LORAPLEX_STATE": str(tmp_path / "state"), "LORAPLEX_ADMIN_TOKEN": "test-token"}
    proc = subprocess.Popen(SERVE + args, cwd=Path(__file__).resolve().parents[2], env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=url, timeout=5) as client:
            deadline = time.monotonic() + START_S
            while True:
                assert proc.poll() is None, f"server exited at start:\n{_tail(log)}"
                assert time.monotonic() < deadline, f"server not ready:\n{_tail(log)}"
                try:
                    if client.get("/ready").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.2)
        yield proc, url, log
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()


def _tail(log) -> str:
    log.flush()
    log.seek(0)
    return log.read()[-4000:]


LONG_TOKENS = 150  # long enough that the six requests still run when the checks after SIGTERM do


def _send_six_then_sigterm(proc, url: str, base) -> tuple[list[dict], dict[int, httpx.Response]]:
    """Six requests (every other one streamed) on two slots, SIGTERM once all are accepted; checks that
    /ready and a new request get 503 meanwhile, and returns each request's response once answered."""
    bodies = [{**BODY, "max_tokens": LONG_TOKENS, "stream": i % 2 == 1} for i in range(6)]
    prompt_tokens = len(base.tokenizer(BODY["prompt"])["input_ids"])
    results: dict[int, httpx.Response] = {}

    def send(i: int, body: dict) -> None:
        with httpx.Client(base_url=url, timeout=START_S) as client:
            with client.stream("POST", "/v1/completions", json=body) as response:
                response.read()
                results[i] = response

    threads = [threading.Thread(target=send, args=(i, b)) for i, b in enumerate(bodies)]
    for thread in threads:
        thread.start()
    with httpx.Client(base_url=url, timeout=WAIT_S) as probe:
        _wait_until(lambda: _prompt_tokens_counted(probe) >= prompt_tokens * len(bodies), "all six to be accepted")
        proc.send_signal(signal.SIGTERM)
        _wait_until(lambda: probe.get("/ready").status_code == 503, "/ready to go 503")
        refused = probe.post("/v1/completions", json=BODY)
        assert refused.status_code == 503, refused.text
        assert refused.headers["retry-after"]
    for thread in threads:
        thread.join(START_S)
    assert len(results) == len(bodies)
    return bodies, results


def test_sigterm_drains_a_real_server_and_exits_0(server_process, tiny_llama_base):
    """More requests than --max-num-seqs, streamed and not: at SIGTERM some run and some are queued.
    Every one gets its complete answer; a new one gets 503; /ready is 503; the exit status is 0."""
    proc, url, log = server_process
    bodies, results = _send_six_then_sigterm(proc, url, tiny_llama_base)
    assert proc.wait(WAIT_S) == 0, _tail(log)
    for i, body in enumerate(bodies):
        response = results[i]
        assert response.status_code == 200, (i, response.text, _tail(log))
        if body["stream"]:
            events = _sse_events(response.text)
            assert events[-1] == "[DONE]" and json.loads(events[-2])["choices"][0]["finish_reason"] == "length"
        else:
            assert response.json()["usage"]["completion_tokens"] == LONG_TOKENS


@pytest.mark.parametrize("server_process", [0.5], indirect=True)
def test_past_the_shutdown_timeout_a_real_server_answers_503_and_exits_0(server_process, tiny_llama_base):
    """--shutdown-timeout 0.5 s: what has not finished by then is answered (a 503 body, or a stream's
    error event), never dropped; the exit status is still 0."""
    proc, url, log = server_process
    bodies, results = _send_six_then_sigterm(proc, url, tiny_llama_base)
    assert proc.wait(WAIT_S) == 0, _tail(log)
    cut_short = 0
    for i, body in enumerate(bodies):
        response = results[i]
        if body["stream"]:
            assert response.status_code == 200
            last = _sse_events(response.text)[-1]
            if last != "[DONE]":  # cut short: the stream ends with an error event
                assert json.loads(last)["error"]["code"] == 503, response.text
                cut_short += 1
        elif response.status_code != 200:
            assert response.status_code == 503, (response.status_code, response.text)
            assert "shutting down" in response.json()["error"]["message"]
            cut_short += 1
    assert cut_short, "every request finished within 0.5 s: nothing was cut short"
