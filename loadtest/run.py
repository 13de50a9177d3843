"""One bounded load run, start to report: `python -m loadtest.run --users 8 --run-time 5m --swaps 12`.

It starts a decoder server (smollm2-135m, 8 completion adapters) and an encoder server (minilm-l6,
the sentiment classifier) on free loopback ports, measures every swap version's greedy probe answer
on the quiet decoder, writes the plan, runs Locust headless as its own process, stops the servers and
writes the report folder:

  summary.json      figures (loadtest/report.py), failures and wrong-version count
  failures.json     every failed request and every wrong-version answer
  latency.png       throughput and TTFT / e2e p50/p95/p99 over time
  locust_*.csv, locust.html   Locust's own stats, history, failures and exceptions
  versions.json     the admin ops and the wrong answers; records.jsonl: one line per request
  plan.json, *.log  what was sent; the servers' and Locust's logs

Exit status 0 only when no request failed and no answer came from the wrong version.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from loadtest import prepare
from loadtest.report import RunFiles, build_report
from loadtest.serve import running, start_server
from loadtest.workload import Plan, admin_schedule

REPO = Path(__file__).resolve().parents[1]
LOCUST_BIN = Path(sys.executable).parent / "locust"
DECODER, ENCODER = "smollm2-135m", "minilm-l6"
CLASSIFIERS = ("sentiment",)
SWAP_NAME = "swap"
PROBE_PROMPT = "The capital of France is"
# The encoder's forwards are small; one thread keeps it from contending with the decoder's (on a few
# cores, two processes each running a thread per core slow each other down many times over).
ENCODER_THREADS = 1
MIN_USERS = 5  # admin + probe (fixed) and one of each weighted class
DURATION = re.compile(r"(\d+)([hms])")
UNIT_S = {"h": 3600, "m": 60, "s": 1}


def parse_duration(text: str) -> float:
    """Locust's run-time syntax: 20s, 5m, 1h30m (a bare number is seconds)."""
    if text.isdigit():
        return float(text)
    parts = DURATION.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (use 20s, 5m, 1h30m)")
    return float(sum(int(n) * UNIT_S[u] for n, u in parts))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="loadtest/run.sh", description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=8, help="concurrent Locust users (default 8)")
    parser.add_argument("--run-time", default="60s", help="how long Locust runs: 20s, 5m (default 60s)")
    parser.add_argument("--swaps", type=int, default=3, help="replaces of the swap adapter during the run "
                        "(plus its adds and removes, loadtest/workload.py; default 3)")
    parser.add_argument("--out", type=Path, default=None, help="report folder (default runs/loadtest/<time>)")
    parser.add_argument("--seed", type=int, default=0, help="adapters, zipf ranking, samples (default 0)")
    parser.add_argument("--zipf", type=float, default=1.1, help="zipf exponent of adapter popularity")
    parser.add_argument("--max-output-tokens", type=int, default=64, help="clip of the real answer lengths")
    parser.add_argument("--probe-tokens", type=int, default=8, help="greedy tokens per version probe")
    parser.add_argument("--stop-timeout", type=int, default=60, help="seconds users get to finish at the end")
    parser.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) - 1),
                        help="the decoder's torch threads (default: one core left for Locust and the encoder)")
    parser.add_argument("--server-arg", action="append", default=[],
                        help="one more `server serve` argument for the decoder (repeatable), "
                             "e.g. --server-arg=--max-num-seqs=8")
    args = parser.parse_args(argv)
    args.run_time_s = parse_duration(args.run_time)
    if args.users < MIN_USERS:
        parser.error(f"--users must be at least {MIN_USERS} (admin, probe, completion, chat, classify)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = (args.out or REPO / "runs" / "loadtest" / time.strftime("%Y%m%d-%H%M%S")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    files = RunFiles(out)
    files.records.write_text("")
    token = secrets.token_urlsafe(32)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="loraplex-loadtest-") as tmp:
        work = Path(tmp)
        from adapters import resolve_base  # heavy imports after argument checks
        from transformers import AutoTokenizer

        cache = Path(os.environ.get("LORAPLEX_CACHE", Path.home() / ".cache" / "loraplex"))
        decoder_base = resolve_base(DECODER, cache)
        traffic, swaps = prepare.build_adapters(decoder_base.path, DECODER, work / "adapters", args.seed)
        classifiers = {name: path for name, path in prepare.example_adapters("classification").items()
                       if name in CLASSIFIERS}
        servers = [
            start_server(DECODER, traffic, work / "state-decoder", [work / "adapters"], token, out / "server.log",
                         ("--threads", str(args.threads), *args.server_arg)),
            start_server(ENCODER, classifiers, work / "state-encoder", [], token, out / "server-encoder.log",
                         ("--threads", str(ENCODER_THREADS))),
        ]
        tokenizer = AutoTokenizer.from_pretrained(decoder_base.path)
        samples = prepare.completion_samples(tokenizer, args.seed, 1, args.max_output_tokens)
        texts = prepare.classify_texts(args.seed)
        with running(servers) as (decoder, encoder):
            expected = prepare.reference_answers(decoder.url, token, DECODER, swaps, PROBE_PROMPT, args.probe_tokens)
            plan = Plan(
                completion_host=decoder.url, classify_host=encoder.url, base=DECODER, adapters=tuple(traffic),
                classifiers=tuple(classifiers), samples=samples, classify_texts=texts, swap_name=SWAP_NAME,
                swap_folders={label: str(path) for label, path in swaps.items()}, expected=expected,
                probe_prompt=PROBE_PROMPT, probe_tokens=args.probe_tokens, admin_ops=admin_schedule(args.swaps),
                run_time_s=args.run_time_s, records_path=str(files.records), versions_path=str(files.versions),
                seed=args.seed, zipf_exponent=args.zipf,
            )
            plan.save(out / "plan.json")
            locust_rc = run_locust(args, plan, out, token)
    meta = {"users": args.users, "run_time": args.run_time, "swaps": args.swaps, "seed": args.seed,
            "decoder_threads": args.threads,
            "locust_exit": locust_rc, "load_average_before": load_before, "load_average_after": os.getloadavg(),
            "cpu_count": os.cpu_count(), "report": str(out)}
    summary = build_report(out, meta)
    print(json.dumps({k: v for k, v in summary.items() if k != "wrong_answers"}, indent=1))
    ok = (summary["failures"] == 0 and not summary["failed_requests"] and not summary["task_errors"]
          and summary["wrong_version"] == 0 and summary["versions_verified"] > 0)
    print(f"report: {out} ({'ok' if ok else 'FAILED'})")
    return 0 if ok else 1


def run_locust(args: argparse.Namespace, plan: Plan, out: Path, token: str) -> int:
    """Locust in its own process (it cannot share one with torch), headless, bounded."""
    cmd = [str(LOCUST_BIN), "-f", str(REPO / "loadtest" / "locustfile.py"), "--headless",
           "--host", plan.completion_host, "--users", str(args.users), "--spawn-rate", str(args.users),
           "--run-time", args.run_time, "--stop-timeout", str(args.stop_timeout),
           "--csv", str(RunFiles(out).locust_prefix), "--csv-full-history", "--html", str(out / "locust.html"),
           "--only-summary", "--loglevel", "WARNING", "--plan", str(out / "plan.json")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "LORAPLEX_ADMIN_TOKEN": token}
    with open(out / "locust.log", "w") as log:
        return subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO).returncode


if __name__ == "__main__":
    sys.exit(main())
