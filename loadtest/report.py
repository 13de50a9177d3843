"""The report folder's summary.json, failures.json and latency.png, from the run's request records and version ledger.

summary.json: sustained requests/s and output tokens/s of the workload (completions, chat,
classification; the version probes are counted apart), p50/p95/p99 of TTFT, TPOT, ITL and e2e in
milliseconds (vLLM `bench serve`'s definitions, loadtest/timing.py), failures (Locust's count, which
includes wrong versions, and the failed records by kind), wrong-version count, version checks and admin
operations. latency.png: throughput and TTFT / e2e percentiles over time, admin operations marked.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from loadtest.timing import RequestRecord

WORKLOAD_KINDS = ("completion", "chat", "classify")
GENERATION_KINDS = ("completion", "chat")
PERCENTILES = (50, 95, 99)
PLOT_BINS = 40
MS = 1000.0


@dataclass(frozen=True)
class RunFiles:
    folder: Path

    @property
    def records(self) -> Path:
        return self.folder / "records.jsonl"

    @property
    def versions(self) -> Path:
        return self.folder / "versions.json"

    @property
    def locust_prefix(self) -> Path:
        return self.folder / "locust"

    @property
    def locust_stats(self) -> Path:
        return self.folder / "locust_stats.csv"

    @property
    def summary(self) -> Path:
        return self.folder / "summary.json"

    @property
    def plot(self) -> Path:
        return self.folder / "latency.png"

    @property
    def failures(self) -> Path:
        return self.folder / "failures.json"


def load_records(path: Path) -> list[RequestRecord]:
    if not path.exists():
        return []
    return [RequestRecord.from_json(line) for line in path.read_text().splitlines() if line.strip()]


def percentiles_ms(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {f"p{p}": None for p in PERCENTILES}
    found = np.percentile(np.asarray(values) * MS, PERCENTILES)
    return {f"p{p}": round(float(v), 2) for p, v in zip(PERCENTILES, found)}


def locust_failures(stats_csv: Path) -> int | None:
    """The Aggregated row's failure count (None when Locust wrote no stats)."""
    if not stats_csv.exists():
        return None
    with stats_csv.open() as fh:
        for row in csv.DictReader(fh):
            if row.get("Name") == "Aggregated":
                return int(row["Failure Count"])
    return None


def locust_exceptions(exceptions_csv: Path) -> int:
    """Exceptions raised inside users' tasks (a bug in the load test itself, or an unexpected answer)."""
    if not exceptions_csv.exists():
        return 0
    with exceptions_csv.open() as fh:
        return sum(int(row["Count"]) for row in csv.DictReader(fh))


def summarize(records: list[RequestRecord], versions: dict, locust_failure_count: int | None,
              meta: dict, task_errors: int = 0) -> dict:
    workload = [r for r in records if r.kind in WORKLOAD_KINDS]
    generation = [r for r in workload if r.kind in GENERATION_KINDS and r.ok]
    streamed = [r for r in generation if r.stream]
    if records:
        start = min(r.started for r in records)
        duration = max(r.started + r.e2e_s for r in records) - start
    else:
        duration = 0.0
    per_s = (lambda n: round(n / duration, 3)) if duration > 0 else (lambda n: 0.0)
    failed = {}
    for r in failed_records(records):
        failed[r.kind] = failed.get(r.kind, 0) + 1
    return {
        **meta,
        "duration_s": round(duration, 2),
        "requests": {kind: sum(1 for r in records if r.kind == kind) for kind in (*WORKLOAD_KINDS, "probe")},
        "requests_per_s": per_s(sum(1 for r in workload if r.ok)),
        "output_tokens_per_s": per_s(sum(r.output_tokens for r in generation)),
        "ttft_ms": percentiles_ms([r.ttft_s for r in streamed if r.ttft_s is not None]),
        "tpot_ms": percentiles_ms([r.tpot_s for r in streamed if r.tpot_s is not None]),
        "itl_ms": percentiles_ms([gap for r in streamed for gap in r.itl_s]),
        "e2e_ms": percentiles_ms([r.e2e_s for r in generation]),
        "failures": locust_failure_count if locust_failure_count is not None else sum(failed.values()),
        "failed_requests": failed,
        "task_errors": task_errors,
        "wrong_version": versions.get("wrong", 0),
        "version_checks": versions.get("checked", 0),
        "versions_verified": len(versions.get("verified", {})),  # distinct versions whose answers were checked
        "answers_verified": sum(versions.get("verified", {}).values()),
        "admin_ops": versions.get("admin_ops", 0),
        "wrong_answers": versions.get("wrong_answers", []),
    }


def failed_records(records: list[RequestRecord]) -> list[RequestRecord]:
    """Requests that failed; a probe's 404 / 409 is not one by itself (the version ledger judges those)."""
    return [r for r in records if not r.ok and not (r.kind == "probe" and r.status in (404, 409))]


def plot(records: list[RequestRecord], versions: dict, out: Path) -> None:
    """Throughput, then TTFT and e2e p50/p95/p99, per time bin (by completion time)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in records if r.kind in WORKLOAD_KINDS and r.ok]
    fig, axes = plt.subplots(3, 1, figsize=(10, 10), sharex=True)
    if done:
        start = min(r.started for r in records)
        ends = np.array([r.started + r.e2e_s - start for r in done])
        width = max(1.0, math.ceil(ends.max() / PLOT_BINS))
        bins = np.arange(0.0, ends.max() + width, width)
        which = np.digitize(ends, bins) - 1
        centers = bins[:-1] + width / 2
        tokens = np.array([r.output_tokens for r in done], dtype=float)
        axes[0].plot(centers, np.bincount(which, minlength=len(centers))[:len(centers)] / width, label="requests/s")
        twin = axes[0].twinx()
        twin.plot(centers, np.bincount(which, weights=tokens, minlength=len(centers))[:len(centers)] / width,
                  color="tab:orange", label="output tokens/s")
        twin.set_ylabel("output tokens/s")
        axes[0].set_ylabel("requests/s")
        axes[0].legend(loc="upper left")
        twin.legend(loc="upper right")
        for ax, metric, label in ((axes[1], "ttft_s", "TTFT (streamed)"), (axes[2], "e2e_s", "end-to-end")):
            for p in PERCENTILES:
                series = []
                for b in range(len(centers)):
                    values = [getattr(r, metric) for r, w in zip(done, which) if w == b
                              and r.kind in GENERATION_KINDS and getattr(r, metric) is not None]
                    series.append(np.percentile(values, p) * MS if values else np.nan)
                ax.plot(centers, series, marker=".", label=f"p{p}")
            ax.set_ylabel(f"{label} ms")
            ax.legend(loc="upper left")
        for op in versions.get("ops", []):
            if op.get("wall") is not None:
                for ax in axes:
                    ax.axvline(op["wall"] - start, color="grey", linestyle=":", linewidth=1)
    axes[-1].set_xlabel("seconds since the first request (dotted: admin add / replace / remove)")
    fig.suptitle("loraplex load run")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def build_report(folder: Path, meta: dict) -> dict:
    files = RunFiles(folder)
    records = load_records(files.records)
    versions = json.loads(files.versions.read_text()) if files.versions.exists() else {}
    summary = summarize(records, versions, locust_failures(files.locust_stats), meta,
                        locust_exceptions(files.folder / "locust_exceptions.csv"))
    files.summary.write_text(json.dumps(summary, indent=1))
    files.failures.write_text(json.dumps({
        "failed_requests": [{"started": r.started, "kind": r.kind, "model": r.model, "stream": r.stream,
                             "status": r.status, "error": r.error} for r in failed_records(records)],
        "wrong_versions": versions.get("wrong_answers", []),
    }, indent=1))
    plot(records, versions, files.plot)
    return summary
