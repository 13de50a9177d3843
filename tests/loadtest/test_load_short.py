"""A short real load run (./loadtest/run.sh's code path): two real servers on loopback, Locust as its own
process, about 20 s with 6 users and 3 hot swaps of one adapter name. It fails on any failed request
and on any answer from the wrong adapter version, and checks the report folder's files.

About 70 s on a 2-core machine (server start and the reference answers take about 30 of them)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
LOCUST_BIN = Path(sys.executable).parent / "locust"
RUN_TIMEOUT_S = 400
SWAPS = 3


def test_short_load_run_with_hot_swaps(tmp_path, smollm2_base, minilm_base):
    assert LOCUST_BIN.exists(), "locust is missing: ./scripts/setup.sh installs the loadtest extra"
    out = tmp_path / "report"
    cmd = [sys.executable, "-m", "loadtest.run", "--users", "6", "--run-time", "20s", "--swaps", str(SWAPS),
           "--max-output-tokens", "16", "--stop-timeout", "30", "--out", str(out)]
    run = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    logs = "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(out.glob("*.log")))
    assert run.returncode == 0, f"{run.stdout[-3000:]}\n{run.stderr[-3000:]}\n{logs}"

    summary = json.loads((out / "summary.json").read_text())
    assert summary["failures"] == 0 and summary["failed_requests"] == {}, (out / "failures.json").read_text()
    assert summary["task_errors"] == 0, (out / "locust_exceptions.csv").read_text()
    assert summary["wrong_version"] == 0, summary["wrong_answers"]
    assert summary["admin_ops"] == SWAPS + 2  # add, 3 replaces, remove
    assert summary["versions_verified"] >= 2, "the probes saw too few versions to prove anything"
    assert all(summary["requests"][kind] > 0 for kind in ("completion", "chat", "classify", "probe"))
    for figure in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
        p50, p95, p99 = (summary[figure][p] for p in ("p50", "p95", "p99"))
        assert 0 < p50 <= p95 <= p99, (figure, summary[figure])
    assert summary["requests_per_s"] > 0 and summary["output_tokens_per_s"] > 0

    for name in ("locust_stats.csv", "locust_failures.csv", "locust_stats_history.csv", "locust.html",
                 "latency.png", "failures.json", "versions.json", "records.jsonl", "plan.json"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "latency.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    plan = json.loads((out / "plan.json").read_text())
    assert len(plan["adapters"]) == 8 and plan["completion_host"].startswith("http://127.0.0.1:")
