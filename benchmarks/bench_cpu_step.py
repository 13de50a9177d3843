"""The CPU decode step against this machine's own limits, in ONE run: in process and over HTTP, base only
and with 8 distinct adapters mixed, fp32 and bf16.

Measured first, on this machine, in this run:
- read bandwidth: the best of several sums over a 1 GiB fp32 tensor (every byte read once);
- fp32 matmul peak: the best of several 2048 x 2048 x 2048 products.
From them, per dtype, two ceilings on batch-`--concurrency` decode tokens/s:
- the memory roofline: bytes one decode step must read (every weight once, the tied embedding once, plus
  the batch's KV cache at the run's mean context) over the read bandwidth, times the batch;
- the compute roofline: 2 x parameters x batch FLOPs per step over the matmul peak (a bf16 base computes
  in fp32 on a CPU without bf16 arithmetic, so the same peak applies).
Then the engine, the same requests (`--prompt-tokens` real tokens each, exactly `--new-tokens` out, eos
ignored, `--concurrency` at a time), interleaved over `--rounds`: (a) in process, base only, (b) in
process, each request on one of `--adapters` distinct rank-`--rank` adapters (q, k, v, o), (c) over HTTP,
streamed, base only, (d) over HTTP, mixed. The HTTP server is `server serve` on loopback with the same
adapters, idle while the in-process runs go (and the in-process engine stopped while HTTP runs).

The last line is JSON: per dtype, tokens/s of a-d (whole-run tokens/s, prefills included, as a client
sees it; decode-only tokens/s of the in-process runs beside them), the two rooflines, and the ratios
base/memory roofline, base/compute roofline, mixed/base in process and over HTTP, HTTP/in process.

    python benchmarks/bench_cpu_step.py                      # fp32 and bf16 (about 15 minutes here)
    python benchmarks/bench_cpu_step.py --dtypes float32 --rounds 1 --requests 16   # quicker
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench_http_streaming import run_clients  # noqa: E402
from bench_multi_adapter import make_peft_adapters, make_prompts, run_engine  # noqa: E402

from adapters import read_adapter_folder, resolve_base  # noqa: E402
from loadtest.serve import running, start_server  # noqa: E402
from server.engine.backend import Backend  # noqa: E402
from server.engine.base_model import load_base  # noqa: E402
from server.engine.loaded import load_adapter  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
BANDWIDTH_BYTES = 1 << 30
PEAK_SIZE = 2048
RESULTS = Path(__file__).resolve().parent / "results"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", default="smollm2-135m")
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=list(DTYPES))
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--adapters", type=int, default=8)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--tag", default="", help="appended to the results file's name")
    p.add_argument("--cache-dir", default=os.environ.get("LORAPLEX_CACHE", str(Path.home() / ".cache" / "loraplex")))
    return p.parse_args()


def best_seconds(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return best


def machine_limits(threads: int) -> dict:
    """Read bandwidth (bytes/s) and fp32 matmul peak (FLOP/s), measured here with `threads` threads."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        data = torch.ones(BANDWIDTH_BYTES // 4)
        bandwidth = BANDWIDTH_BYTES / best_seconds(data.sum, 8)
        del data
        a, b = torch.randn(PEAK_SIZE, PEAK_SIZE), torch.randn(PEAK_SIZE, PEAK_SIZE)
        peak = 2 * PEAK_SIZE ** 3 / best_seconds(lambda: a @ b, 5)
    finally:
        torch.set_num_threads(previous)
    return {"read_bandwidth_gb_s": bandwidth / 1e9, "fp32_matmul_gflop_s": peak / 1e9}


def rooflines(base, limits: dict, batch: int, mean_context: int) -> dict:
    """Decode tokens/s ceilings of `base` at `batch` rows: memory (bytes per step / bandwidth) and compute."""
    tensors = {id(t): t for t in (*base.model.parameters(), *base.model.buffers())}
    weight_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
    params = sum(t.numel() for t in base.model.parameters())
    config = base.model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_bytes = (2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * mean_context * batch
                * base.backend.dtype.itemsize)
    step_bytes = weight_bytes + kv_bytes
    memory = batch / (step_bytes / (limits["read_bandwidth_gb_s"] * 1e9))
    compute = batch / (2 * params * batch / (limits["fp32_matmul_gflop_s"] * 1e9))
    return {"step_bytes_mb": step_bytes / 1e6, "memory_roofline_tokens_per_s": memory,
            "compute_roofline_tokens_per_s": compute}


def measure_dtype(args, dtype_name: str, prepared, prompts_ids, paths: list[Path], limits: dict, tmp: Path) -> dict:
    backend = Backend(torch.device("cpu"), DTYPES[dtype_name])
    base = load_base(prepared, backend, lora_kernel="stacked", lora_slots=max(32, args.adapters))
    loaded = [load_adapter(f"adapter-{i}", 1, read_adapter_folder(p), backend.device, backend.dtype)
              for i, p in enumerate(paths)]
    mixed = [loaded[i % len(loaded)] for i in range(len(prompts_ids))]
    texts = [base.tokenizer.decode(ids) for ids in prompts_ids]
    names = [f"adapter-{i}" for i in range(len(paths))]
    runs: dict[str, list[dict]] = {"inproc_base": [], "inproc_mixed": [], "http_base": [], "http_mixed": []}
    server = start_server(args.base, dict(zip(names, paths)), tmp / f"state-{dtype_name}", [tmp], "bench",
                          tmp / f"server-{dtype_name}.log",
                          ("--dtype", dtype_name, "--threads", str(args.threads),
                           "--max-num-seqs", str(args.concurrency), "--max-loras", str(max(32, args.adapters))))
    with running([server]):
        asyncio.run(run_clients(server.url, [args.base], texts[: args.concurrency], args.concurrency, 4))  # warm-up
        run_engine(base, prompts_ids[: args.concurrency], [None] * args.concurrency, args.concurrency, 4, args.threads)
        for round_index in range(args.rounds):
            runs["inproc_base"].append(run_engine(base, prompts_ids, [None] * len(prompts_ids), args.concurrency,
                                                  args.new_tokens, args.threads))
            runs["inproc_mixed"].append(run_engine(base, prompts_ids, mixed, args.concurrency, args.new_tokens,
                                                   args.threads))
            runs["http_base"].append(asyncio.run(run_clients(server.url, [args.base], texts, args.concurrency,
                                                             args.new_tokens)))
            runs["http_mixed"].append(asyncio.run(run_clients(server.url, names, texts, args.concurrency,
                                                              args.new_tokens)))
            print(f"{dtype_name} round {round_index + 1}:",
                  {k: round(v[-1]["tokens_per_s"], 1) for k, v in runs.items()}, flush=True)
    best = {k: max(r["tokens_per_s"] for r in v) for k, v in runs.items()}
    decode = {k: max(r["decode_tokens_per_s"] for r in v) for k, v in runs.items() if k.startswith("inproc")}
    roof = rooflines(base, limits, args.concurrency, args.prompt_tokens + args.new_tokens // 2)
    return {
        "tokens_per_s": {k: round(v, 1) for k, v in best.items()},
        "decode_tokens_per_s": {k: round(v, 1) for k, v in decode.items()},
        **{k: round(v, 1) for k, v in roof.items()},
        "ratios": {
            "inproc_base/memory_roofline": round(decode["inproc_base"] / roof["memory_roofline_tokens_per_s"], 3),
            "inproc_base/compute_roofline": round(decode["inproc_base"] / roof["compute_roofline_tokens_per_s"], 3),
            "inproc_mixed/inproc_base": round(best["inproc_mixed"] / best["inproc_base"], 3),
            "http_mixed/http_base": round(best["http_mixed"] / best["http_base"], 3),
            "http_base/inproc_base": round(best["http_base"] / best["inproc_base"], 3),
            "http_mixed/inproc_mixed": round(best["http_mixed"] / best["inproc_mixed"], 3),
        },
    }


def main() -> None:
    args = parse_args()
    torch.set_num_threads(1)  # the scheduler thread gets args.threads (bench_multi_adapter.run_engine)
    limits = machine_limits(args.threads)
    print("machine:", {k: round(v, 1) for k, v in limits.items()}, flush=True)
    prepared = resolve_base(args.base, Path(args.cache_dir))
    results = {"base": args.base, "batch": args.concurrency, "threads": args.threads, "rounds": args.rounds,
               **{k: round(v, 1) for k, v in limits.items()}}
    with tempfile.TemporaryDirectory() as scratch:
        tmp = Path(scratch)
        paths = make_peft_adapters(prepared.path, args.adapters, args.rank, tmp)
        from transformers import AutoTokenizer

        prompts = make_prompts(AutoTokenizer.from_pretrained(prepared.path), args.requests, args.prompt_tokens)
        for dtype_name in args.dtypes:
            results[dtype_name] = measure_dtype(args, dtype_name, prepared, prompts, paths, limits, tmp)
            print(dtype_name, json.dumps(results[dtype_name]), flush=True)
    RESULTS.mkdir(exist_ok=True)
    name = f"cpu_step_{datetime.date.today().isoformat()}{'_' + args.tag if args.tag else ''}.json"
    (RESULTS / name).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
