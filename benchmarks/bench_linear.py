"""The base matmul kernels side by side in ONE run: F.linear (MKL) vs oneDNN's linear on plain weights
vs oneDNN on weights packed once (what the server runs on CPU), on the weight shapes of a real base at
decode and prefill batch sizes, cold weights (each matrix read once per pass, as in a forward). Prints
ms per pass and the ratios to F.linear; the last line is JSON.

    python benchmarks/bench_linear.py                 # smollm2-135m shapes, 2 threads
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from adapters import resolve_base
from server.engine.backend import onednn_linear, onednn_pack


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", default="smollm2-135m")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rows", default="1,8,512", help="rows of x: decode batch sizes and a prefill")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--cache-dir", default=os.environ.get("LORAPLEX_CACHE", str(Path.home() / ".cache" / "loraplex")))
    return p.parse_args()


def model_weights(base: str, cache_dir: Path, dtype: torch.dtype) -> list[torch.Tensor]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(resolve_base(base, cache_dir).path, dtype=dtype)
    return [m.weight.detach() for m in model.modules() if isinstance(m, torch.nn.Linear)]


def time_pass(kernel, weights: list[torch.Tensor], x: torch.Tensor, repeats: int) -> float:
    """Median seconds of one pass over every weight (inputs sized per weight)."""
    inputs = {w.shape[1]: x[:, : w.shape[1]].contiguous() if w.shape[1] <= x.shape[1] else
              torch.randn(x.shape[0], w.shape[1], dtype=x.dtype) for w in weights}
    for w in weights:  # warm-up
        kernel(inputs[w.shape[1]], w, None)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        for w in weights:
            kernel(inputs[w.shape[1]], w, None)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    weights = model_weights(args.base, Path(args.cache_dir), dtype)
    mbytes = sum(w.numel() * w.element_size() for w in weights) / 1e6
    print(f"# {args.base}: {len(weights)} weight matrices, {mbytes:.0f} MB in {args.dtype}, {args.threads} threads")
    results = {}
    packed_weights = [onednn_pack(w) for w in weights]
    with torch.inference_mode():
        for rows in (int(r) for r in args.rows.split(",")):
            x = torch.randn(rows, max(w.shape[1] for w in weights), dtype=dtype)
            mkl = time_pass(F.linear, weights, x, args.repeats)
            dnn = time_pass(onednn_linear, weights, x, args.repeats)
            packed = time_pass(onednn_linear, packed_weights, x, args.repeats)
            results[rows] = {"f_linear_ms": mkl * 1e3, "onednn_ms": dnn * 1e3, "onednn_packed_ms": packed * 1e3,
                             "onednn_speedup": mkl / dnn, "packed_speedup": mkl / packed,
                             "packed_gb_per_s": mbytes / 1e3 / packed}
            print(f"rows {rows:4d}: F.linear {mkl * 1e3:8.1f} ms  oneDNN {dnn * 1e3:8.1f} ms ({mkl / dnn:.2f}x)  "
                  f"oneDNN packed {packed * 1e3:8.1f} ms ({mkl / packed:.2f}x, {mbytes / 1e3 / packed:.1f} GB/s)",
                  flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
