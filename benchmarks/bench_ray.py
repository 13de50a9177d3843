"""Scale-out on Ray Serve, as clients see it: requests/s and TTFT of `server ray-serve` with 1 and 2 replicas
against `server serve` alone, in ONE run on this machine (each engine one torch thread, as the replicas get
one CPU each), printed as ratios, written to benchmarks/results/ray_<date>.json.

Every configuration gets the same traffic: N adapters (random rank-8 LoRA on q,k,v,o), a warm-up request per
adapter (each is loaded, and Ray has learned which replica holds it), then C concurrent streaming clients
sending R requests round-robin over the adapters (prompt P tokens, G new tokens, greedy, ignore_eos). TTFT is
from sending a request to its first text event. `server serve --threads 2` (one process on both cores) is
run too, as the single server's best on this machine.

    python benchmarks/bench_ray.py                      # the committed figures
    python benchmarks/bench_ray.py --clients 16 --requests 64 --no-serve-2-threads --tag c16   # saturated

It waits while /tmp/bench.lock exists (another benchmark on this machine) and holds it while it runs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_llamacpp import free_port  # noqa: E402
from bench_multi_adapter import make_peft_adapters, make_prompts  # noqa: E402

STARTUP_TIMEOUT_S = 600
LOCK = Path("/tmp/bench.lock")
LOCK_POLL_S = 20
BIN = Path(sys.executable).parent
RESULTS = Path(__file__).resolve().parent / "results"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", default="smollm2-135m")
    p.add_argument("--adapters", type=int, default=8)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests", type=int, default=48)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--no-serve-2-threads", dest="serve_2_threads", action="store_false",
                   help="skip `server serve --threads 2`")
    p.add_argument("--tag", default="", help="appended to the results file's name (ray_<date>_<tag>.json)")
    p.add_argument("--cache-dir", default=os.environ.get("LORAPLEX_CACHE", str(Path.home() / ".cache" / "loraplex")))
    return p.parse_args()


@contextlib.contextmanager
def bench_lock():
    while LOCK.exists():
        print(f"waiting: {LOCK} exists (another benchmark runs)", flush=True)
        time.sleep(LOCK_POLL_S)
    LOCK.write_text(f"bench_ray.py pid {os.getpid()}\n")
    try:
        yield
    finally:
        LOCK.unlink(missing_ok=True)


@contextlib.contextmanager
def started(cmd: list[str], env: dict, log: Path, ready_targets: int):
    """Run `cmd` until /ready answers (and, for ray-serve, /metrics/targets lists `ready_targets`); stop it
    and, for Ray, every Ray process it left."""
    port = cmd[cmd.index("--port") + 1]
    url = f"http://127.0.0.1:{port}"
    with open(log, "w") as out:
        launched = time.monotonic()
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = launched + STARTUP_TIMEOUT_S
            while True:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"{cmd[1]} did not start:\n{log.read_text()[-3000:]}")
                with contextlib.suppress(httpx.HTTPError):
                    ok = httpx.get(f"{url}/ready", timeout=5).status_code == 200
                    if ok and ready_targets:
                        ok = len(httpx.get(f"{url}/metrics/targets", timeout=10).json()) == ready_targets
                    if ok:
                        break
                time.sleep(0.5)
            yield url, time.monotonic() - launched
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            if cmd[1] == "ray-serve":
                subprocess.run([str(BIN / "ray"), "stop", "--force"], env=env, capture_output=True, timeout=120)


async def stream_one(client: httpx.AsyncClient, model: str, prompt: str, new_tokens: int) -> tuple[float, int]:
    """(TTFT in seconds, completion tokens) of one streamed completion."""
    body = {"model": model, "prompt": prompt, "max_tokens": new_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    sent, first, tokens = time.perf_counter(), None, 0
    async with client.stream("POST", "/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise SystemExit(f"a request failed: {chunk['error']}")
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif first is None and any(c.get("text") for c in chunk["choices"]):
                first = time.perf_counter()
    return (first or time.perf_counter()) - sent, tokens


async def load(url: str, models: list[str], prompts: list[str], clients: int, new_tokens: int) -> dict:
    queue: asyncio.Queue = asyncio.Queue()
    for i, prompt in enumerate(prompts):
        queue.put_nowait((models[i % len(models)], prompt))
    ttfts: list[float] = []
    tokens = 0

    async def client_loop() -> None:
        nonlocal tokens
        async with httpx.AsyncClient(base_url=url, timeout=600) as client:
            while not queue.empty():
                model, prompt = queue.get_nowait()
                ttft, count = await stream_one(client, model, prompt, new_tokens)
                ttfts.append(ttft)
                tokens += count

    began = time.perf_counter()
    await asyncio.gather(*(client_loop() for _ in range(clients)))
    seconds = time.perf_counter() - began
    ttfts.sort()
    return {"requests": len(prompts), "seconds": round(seconds, 2), "requests_per_s": round(len(prompts) / seconds, 3),
            "tokens_per_s": round(tokens / seconds, 2), "ttft_p50_s": round(statistics.median(ttfts), 3),
            "ttft_p99_s": round(ttfts[min(len(ttfts) - 1, round(0.99 * (len(ttfts) - 1)))], 3)}


async def warm_up(url: str, models: list[str], prompt: str) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        for model in models:  # one at a time: each adapter's first use picks its replica
            await stream_one(client, model, prompt, 2)
    await asyncio.sleep(1.0)  # Ray's routers learn which replica holds what (pushed every 0.1 s)


def adapter_loads(url: str) -> dict:
    """Over every replica's metrics: adapter folder reads (first uses) and their mean time."""
    from prometheus_client.parser import text_string_to_metric_families

    count = total = 0.0
    for target in httpx.get(f"{url}/metrics/targets", timeout=30).json():
        text = httpx.get(f"http://{target['targets'][0]}/metrics", timeout=30).text
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == "loraplex_adapter_load_seconds_count":
                    count += sample.value
                elif sample.name == "loraplex_adapter_load_seconds_sum":
                    total += sample.value
    return {"adapter_loads": int(count), "adapter_load_mean_ms": round(1000 * total / count, 1) if count else None}


def run_config(name: str, cmd: list[str], env: dict, tmp: Path, targets: int, models, prompts, args) -> dict:
    print(f"== {name}: {' '.join(cmd[1:3])} ...", flush=True)
    with started(cmd, env, tmp / f"{name}.log", targets) as (url, startup_s):
        asyncio.run(warm_up(url, models, prompts[0]))
        result = asyncio.run(load(url, models, prompts, args.clients, args.new_tokens))
        result["startup_s"] = round(startup_s, 1)
        if targets:
            result.update(adapter_loads(url))
    print(f"   {name}: {result}", flush=True)
    return result


def main() -> None:
    args = parse_args()
    from transformers import AutoTokenizer

    from adapters import resolve_base

    prepared = resolve_base(args.base, Path(args.cache_dir))
    tokenizer = AutoTokenizer.from_pretrained(prepared.path)
    prompts = [tokenizer.decode(ids) for ids in make_prompts(tokenizer, args.requests, args.prompt_tokens)]
    with bench_lock(), tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        paths = make_peft_adapters(prepared.path, args.adapters, args.rank, tmp)
        models = [f"adapter-{i}" for i in range(args.adapters)]
        flags = ["--base", args.base, "--log-level", "warning", "--max-num-seqs", str(args.clients)]
        for name, path in zip(models, paths):
            flags += ["--adapter", f"{name}={path}"]
        env = {**os.environ, "LORAPLEX_STATE": str(tmp / "state"), "RAY_USAGE_STATS_ENABLED": "0"}
        env.pop("LORAPLEX_ADMIN_TOKEN", None)

        def serve(threads: int) -> list[str]:
            return [str(BIN / "server"), "serve", "--port", str(free_port()), "--threads", str(threads), *flags]

        def ray(replicas: int) -> list[str]:
            return [str(BIN / "server"), "ray-serve", "--replicas", str(replicas), "--threads", "1",
                    "--port", str(free_port()), "--metrics-port", "0", *flags]

        results = {"serve": run_config("serve", serve(1), env, tmp, 0, models, prompts, args),
                   "ray_1": run_config("ray_1", ray(1), env, tmp, 1, models, prompts, args),
                   "ray_2": run_config("ray_2", ray(2), env, tmp, 2, models, prompts, args)}
        if args.serve_2_threads:
            results["serve_2_threads"] = run_config("serve_2_threads", serve(2), env, tmp, 0, models, prompts, args)

    def ratio(a: str, b: str, key: str) -> float:
        return round(results[a][key] / results[b][key], 3)

    ratios = {f"{a}/{b} {key}": ratio(a, b, key) for a, b in (("ray_1", "serve"), ("ray_2", "serve"), ("ray_2", "ray_1"))
              for key in ("requests_per_s", "ttft_p99_s")}
    if "serve_2_threads" in results:
        ratios.update({f"ray_2/serve_2_threads {key}": ratio("ray_2", "serve_2_threads", key)
                       for key in ("requests_per_s", "ttft_p99_s")})
    report = {"date": datetime.date.today().isoformat(), "cpus": os.cpu_count(),
              "settings": {k: v for k, v in vars(args).items() if k not in ("cache_dir", "tag")}, "results": results,
              "ratios": ratios}
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"ray_{report['date']}{'_' + args.tag if args.tag else ''}.json"
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"written to {out}")
    print(json.dumps(ratios))


if __name__ == "__main__":
    main()
