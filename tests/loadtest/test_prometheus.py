"""A real Prometheus scrapes /metrics during a short load run, and PromQL over what it stored answers the
request count the run made, per adapter too; every expression of the Grafana dashboard then runs on it.

The binary is Debian's `prometheus` package unpacked into $LORAPLEX_CACHE/prometheus by
scripts/get-prometheus.sh (setup.sh runs it); without it this test fails, saying so.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import uvicorn

from server.api.app import create_app
from tests.loadtest import dashboard
from tests.loadtest.tiny_app import ADAPTER, SERVED_NAME, completion, tiny_config
from tests.server.conftest import make_causal_adapter

pytestmark = pytest.mark.integration

REQUESTS = {SERVED_NAME: 5, ADAPTER: 4}  # completions per model in the load run
CLIENTS = 3  # concurrent clients
SCRAPE_INTERVAL_S = 1
STARTUP_WAIT_S = 30
SCRAPE_WAIT_S = 30  # how long Prometheus may take to store the final counts
POLL_S = 0.25
STOP_WAIT_S = 10


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_until(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(POLL_S)


@pytest.fixture(scope="module")
def prometheus_binary(cache_dir: Path) -> Path:
    unpacked = cache_dir / "prometheus" / "usr" / "bin" / "prometheus"
    if unpacked.is_file():
        return unpacked
    on_path = shutil.which("prometheus")
    if on_path:
        return Path(on_path)
    pytest.fail(f"no Prometheus binary at {unpacked} nor on PATH: run scripts/get-prometheus.sh "
                "(it unpacks Debian's prometheus package with apt-get download + dpkg -x, no root)")


@pytest.fixture
def live_server(tmp_path: Path, tiny_llama_dir: Path):
    """The server on a free loopback port, in a thread (uvicorn, as `server serve` runs it)."""
    adapter = make_causal_adapter(tiny_llama_dir, tmp_path / ADAPTER, 1, 4, ["q_proj", "v_proj"])
    port = _free_port()
    config = tiny_config(tiny_llama_dir, adapter, tmp_path / "state", port=port)
    server = uvicorn.Server(uvicorn.Config(create_app(config), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    _wait_until(lambda: server.started, STARTUP_WAIT_S, "the server to start")
    yield f"127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=STARTUP_WAIT_S)


@pytest.fixture
def prometheus(tmp_path: Path, prometheus_binary: Path, live_server: str):
    """Prometheus on a free loopback port, scraping the server every SCRAPE_INTERVAL_S; yields an API client."""
    config = tmp_path / "prometheus.yml"
    config.write_text(
        f"global:\n  scrape_interval: {SCRAPE_INTERVAL_S}s\n  scrape_timeout: {SCRAPE_INTERVAL_S}s\n"
        f"scrape_configs:\n  - job_name: loraplex\n    static_configs:\n      - targets: ['{live_server}']\n"
    )
    port = _free_port()
    log = tmp_path / "prometheus.log"
    with log.open("wb") as log_file:
        process = subprocess.Popen(
            [str(prometheus_binary), f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
            stdout=log_file, stderr=subprocess.STDOUT,
        )
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10)
    try:
        def ready() -> bool:
            assert process.poll() is None, f"prometheus exited {process.returncode}:\n{log.read_text()}"
            try:
                return client.get("/-/ready").status_code == 200
            except httpx.TransportError:
                return False

        _wait_until(ready, STARTUP_WAIT_S, "Prometheus to be ready")
        yield client
    finally:
        client.close()
        process.terminate()
        try:
            process.wait(timeout=STOP_WAIT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _query(client: httpx.Client, promql: str) -> list[dict]:
    response = client.get("/api/v1/query", params={"query": promql})
    body = response.json()
    assert response.status_code == 200 and body["status"] == "success", f"{promql!r}: {body}"
    return body["data"]["result"]


def _by_label(result: list[dict], label: str) -> dict[str, float]:
    return {series["metric"].get(label, ""): float(series["value"][1]) for series in result}


def test_promql_counts_the_requests_the_load_run_made(prometheus, live_server):
    _wait_until(lambda: _by_label(_query(prometheus, 'up{job="loraplex"}'), "job") == {"loraplex": 1.0},
                SCRAPE_WAIT_S, "a first successful scrape")
    models = [model for model, count in REQUESTS.items() for _ in range(count)]
    with httpx.Client(base_url=f"http://{live_server}", timeout=60) as server, ThreadPoolExecutor(CLIENTS) as pool:
        statuses = list(pool.map(lambda m: server.post("/v1/completions", json=completion(m)).status_code, models))
    assert statuses == [200] * len(models)

    total = 'sum(loraplex_requests_total{route="/v1/completions"})'
    want = float(len(models))
    _wait_until(lambda: [float(s["value"][1]) for s in _query(prometheus, total)] == [want], SCRAPE_WAIT_S,
                f"{total} to reach {want:g}")
    per_adapter = _query(prometheus, 'sum by (adapter) (loraplex_requests_total{route="/v1/completions"})')
    assert _by_label(per_adapter, "adapter") == {"__base__": REQUESTS[SERVED_NAME], ADAPTER: REQUESTS[ADAPTER]}
    finished = _query(prometheus, "sum(loraplex_e2e_request_latency_seconds_count)")
    assert [float(s["value"][1]) for s in finished] == [want]

    # The dashboard's queries are valid PromQL and find data (a rate needs two scrapes after the run).
    time.sleep(2 * SCRAPE_INTERVAL_S)
    for title, expr in dashboard.expressions(dashboard.load()):
        assert _query(prometheus, expr), f"panel {title!r}: {expr!r} found no series"
