"""Fused q,k,v / gate,up projections (server/engine/fused.py) vs the same base unfused, in ONE process:
decode steps of the two bases alternate, so machine noise hits both alike. Prints each one's median and
10th-percentile step time and the ratio.

    python benchmarks/bench_fused.py                   # fp32, 8 rows, base only
    python benchmarks/bench_fused.py --mixed           # each row on its own rank-16 adapter (q,k,v,o)
    python benchmarks/bench_fused.py --dtype bfloat16 --rows 1
    python benchmarks/bench_fused.py --quant int8 --rows 1   # a quantized base (native kernels stacked)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_multi_adapter import random_adapters  # noqa: E402

from adapters import resolve_base  # noqa: E402
from server.engine.backend import choose_backend  # noqa: E402
from server.engine.base_model import load_base  # noqa: E402
from server.engine.batch_runner import BatchRunner, RowInput  # noqa: E402

PROMPT_TOKENS = 64


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", default="smollm2-135m")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--mixed", action="store_true")
    p.add_argument("--quant", default="none", choices=["none", "int8", "int4"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cache-dir", default=os.environ.get("LORAPLEX_CACHE", str(Path.home() / ".cache" / "loraplex")))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    prepared = resolve_base(args.base, Path(args.cache_dir))
    backend = choose_backend("cpu", args.dtype, args.quant)
    systems = {}
    for name, fuse in (("fused", True), ("unfused", False)):
        base = load_base(prepared, backend, fuse=fuse)
        runner = BatchRunner(base, args.rows, PROMPT_TOKENS + args.steps + 1)
        adapters = random_adapters(base, args.rows, 16, 0) if args.mixed else [None] * args.rows
        runner.forward([RowInput(i, 0, list(range(100, 100 + PROMPT_TOKENS)), adapters[i]) for i in range(args.rows)])
        systems[name] = (runner, adapters)
    times: dict[str, list[float]] = {name: [] for name in systems}
    for step in range(args.steps):
        position = PROMPT_TOKENS + step
        for name, (runner, adapters) in systems.items():
            started = time.perf_counter()
            runner.forward([RowInput(i, position, [position], adapters[i]) for i in range(args.rows)])
            if step >= 5:  # warm-up
                times[name].append(time.perf_counter() - started)
    summary = {"dtype": args.dtype, "quant": args.quant, "rows": args.rows, "mixed": args.mixed}
    for name, values in times.items():
        values.sort()
        summary[f"{name}_median_ms"] = round(values[len(values) // 2] * 1e3, 1)
        summary[f"{name}_p10_ms"] = round(values[len(values) // 10] * 1e3, 1)
    summary["fused/unfused (median)"] = round(summary["fused_median_ms"] / summary["unfused_median_ms"], 3)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
