"""Real processes for the Ray Serve tests: `server serve` and `server ray-serve` on loopback, and the replicas'
metrics as Prometheus serves them."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import httpx
from prometheus_client.parser import text_string_to_metric_families

SERVER_BIN = Path(sys.executable).parent / "server"
RAY_BIN = Path(sys.executable).parent / "ray"
POLL_S = 0.5
STOP_WAIT_S = 90


def quiet_env(state: Path) -> dict[str, str]:
    env = {**os.environ, "LORAPLEX_STATE": str(state), "RAY_USAGE_STATS_ENABLED": "0", "RAY_DEDUP_LOGS": "0"}
    env.pop("LORAPLEX_ADMIN_TOKEN", None)
    return env


@contextlib.contextmanager
def running(cmd: list[str], env: dict[str, str], log: Path, url: str, ready, timeout_s: float) -> Iterator[str]:
    """Start `cmd` in its own session, wait until `ready(url)`, yield `url`; stop it (SIGTERM, then SIGKILL of
    its process group) and, for Ray, every Ray process it left."""
    out = open(log, "w")
    proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            assert proc.poll() is None, log.read_text()[-4000:]
            assert time.monotonic() < deadline, f"not ready in {timeout_s} s: {log.read_text()[-4000:]}"
            with contextlib.suppress(httpx.HTTPError):
                if ready(url):
                    break
            time.sleep(POLL_S)
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=STOP_WAIT_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        if "ray-serve" in cmd:
            subprocess.run([str(RAY_BIN), "stop", "--force"], env=env, capture_output=True, timeout=STOP_WAIT_S)
        out.close()


def replica_metrics(url: str) -> dict[str, dict]:
    """Per replica (by its id): its pid and its samples {(name, frozenset(labels without `replica`)): value}."""
    found = {}
    for target in httpx.get(f"{url}/metrics/targets", timeout=30).json():
        text = httpx.get(f"http://{target['targets'][0]}/metrics", timeout=30).text
        samples, pid = {}, None
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                labels = {k: v for k, v in sample.labels.items() if k != "replica"}
                samples[(sample.name, frozenset(labels.items()))] = sample.value
                if sample.name == "loraplex_replica_info":
                    pid = int(labels["pid"])
        found[target["labels"]["replica"]] = {"pid": pid, "samples": samples}
    return found


def adapters_loaded(metrics: dict) -> dict[str, set[str]]:
    """Adapter -> the replicas that read its folder at least once."""
    loaded: dict[str, set[str]] = {}
    for replica, data in metrics.items():
        for (name, labels), value in data["samples"].items():
            if name == "loraplex_replica_adapter_loads_total" and value > 0:
                loaded.setdefault(dict(labels)["adapter"], set()).add(replica)
    return loaded
