"""`server serve` as a user runs it: a real process on loopback, the official OpenAI client, the admin CLI."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.integration.conftest import example_adapters

STARTUP_TIMEOUT_S = 180
POLL_S = 0.5
SERVER_BIN = Path(sys.executable).parent / "server"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def running_server(tmp_path: Path, base: str, adapters: dict[str, Path]):
    port = _free_port()
    env = {**os.environ, "LORAPLEX_STATE": str(tmp_path / "state")}
    env.pop("LORAPLEX_ADMIN_TOKEN", None)
    cmd = [str(SERVER_BIN), "serve", "--base", base, "--port", str(port), "--log-level", "warning",
           "--adapter-root", str(tmp_path.parent)]  # pytest's base temp: where the hot-added adapters are
    for name, path in adapters.items():
        cmd += ["--adapter", f"{name}={path}"]
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            assert proc.poll() is None, (tmp_path / "server.log").read_text()
            assert time.monotonic() < deadline, "server did not become ready"
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                    break
            time.sleep(POLL_S)
        yield url, env
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def test_completion_server_with_openai_client_and_cli(tmp_path, random_completion_adapter):
    openai = pytest.importorskip("openai")
    examples = example_adapters("completion")
    with running_server(tmp_path, "smollm2-135m", examples) as (url, env):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
        models = {m.id: m for m in client.models.list().data}
        assert set(models) == {"smollm2-135m", *examples}
        for model in ["smollm2-135m", *examples]:
            out = client.completions.create(model=model, prompt="The capital of France is", max_tokens=8,
                                            temperature=0)
            assert out.choices[0].text.strip(), model
            assert out.usage.completion_tokens > 0
        answer = client.chat.completions.create(
            model="smollm2-135m", messages=[{"role": "user", "content": "What is the capital of France?"}],
            max_tokens=20, temperature=0,
        )
        assert "Paris" in answer.choices[0].message.content
        stream = client.chat.completions.create(
            model=next(iter(examples)), messages=[{"role": "user", "content": "Hi!"}], max_tokens=8,
            temperature=0, stream=True,
        )
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

        add = subprocess.run([str(SERVER_BIN), "add-adapter", "hot", str(random_completion_adapter), "--url", url],
                             env=env, capture_output=True, text=True, timeout=120)
        assert add.returncode == 0, add.stderr
        assert "hot" in [m.id for m in client.models.list().data]
        hot = client.completions.create(model="hot", prompt="Hello", max_tokens=4, temperature=0)
        assert hot.choices[0].text
        listed = subprocess.run([str(SERVER_BIN), "list-adapters", "--url", url], env=env, capture_output=True,
                                text=True, timeout=60)
        assert {a["name"] for a in json.loads(listed.stdout)} == {"hot", *examples}

        metrics = httpx.get(f"{url}/metrics").text
        assert "loraplex_generation_tokens_total" in metrics
        assert "loraplex_adapters_loaded 3.0" in metrics or "loraplex_adapters_loaded" in metrics
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model="missing", prompt="x", max_tokens=2)
        with pytest.raises(openai.BadRequestError):
            client.completions.create(model="smollm2-135m", prompt="x", max_tokens=100000)
        assert client.completions.create(model="smollm2-135m", prompt="x", max_tokens=2).choices


def test_classification_server(tmp_path):
    classifiers = example_adapters("classification")
    assert classifiers, "an example classification adapter must ship in examples/adapters"
    with running_server(tmp_path, "minilm-l6", classifiers) as (url, _):
        name = next(iter(classifiers))
        response = httpx.post(f"{url}/v1/classify", json={"model": name, "input": [
            "A moving, beautifully acted film; one of the best of the year.",
            "A tedious, clumsy mess with nothing to say.",
        ]}, timeout=60)
        assert response.status_code == 200, response.text
        data = response.json()["data"]
        assert len(data) == 2 and data[0]["label"] != data[1]["label"]
        assert abs(sum(data[0]["probs"].values()) - 1) < 1e-4

        openai = pytest.importorskip("openai")  # the stock client's embeddings call (it asks for base64)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
        texts = ["A man is eating food.", "A man is riding a horse."]
        base = client.embeddings.create(model="minilm-l6", input=texts)
        floats = client.embeddings.create(model="minilm-l6", input=texts, encoding_format="float")
        tuned = client.embeddings.create(model=name, input=texts)
        assert [len(e.embedding) for e in base.data] == [384, 384] and base.usage.prompt_tokens > 0
        for a, b, c in zip(base.data, floats.data, tuned.data):
            assert sum(x * x for x in a.embedding) == pytest.approx(1.0, abs=1e-5)
            assert a.embedding == pytest.approx(b.embedding, abs=1e-6)
            assert sum(x * y for x, y in zip(a.embedding, c.embedding)) < 0.999  # the adapter changes it
