"""Serving every adapter method in continuous batches, side by side in ONE run on the same model and prompts.

For each method, `--adapters` distinct adapters of it (built in memory, random but of the method's real
shapes) are mixed in the batch, one per request in turn; `mixed` puts every method's adapters in the same
batches. Each is compared with our own base-only path on the same requests (ratio = method / base).
Methods: lora (rank 16 on q,k,v,o), ia3 (PEFT's default targets: k_proj, v_proj, down_proj input),
freeze (the last 2 blocks' MLP linears), prompt (20 virtual tokens), prefix (20 key/value positions in
every layer; P-tuning v2 folders serve the same way). Prompt-learning requests also prefill and attend
over their 20 extra positions, so they do more work than base requests by design.

    .venv/bin/python benchmarks/bench_methods_serving.py                 # about 5 minutes on 2 cores
    .venv/bin/python benchmarks/bench_methods_serving.py --requests 16   # quicker

The last line printed is JSON: tokens/s per method and each one's ratio to base only.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from adapters import resolve_base
from adapters.dense import DenseWeights
from adapters.ia3_spec import IA3Scale
from bench_multi_adapter import make_prompts, random_adapters, run_engine  # a sibling script
from server.engine.backend import Backend
from server.engine.base_model import load_base
from server.engine.loaded import LoadedAdapter

METHODS = ("lora", "ia3", "freeze", "prompt", "prefix")
VIRTUAL_TOKENS = 20
FREEZE_LAST_K = 2


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", default="smollm2-135m")
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--adapters", type=int, default=8, help="distinct adapters per method")
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2, help="interleave the systems over this many rounds")
    p.add_argument("--cache-dir", default=os.environ.get("LORAPLEX_CACHE", str(Path.home() / ".cache" / "loraplex")))
    return p.parse_args()


def _adapter(name: str, **fields) -> LoadedAdapter:
    return LoadedAdapter(name, 1, "completion", Path("."), 0, {}, **fields)


def make_adapters(base, method: str, count: int, seed: int) -> list[LoadedAdapter]:
    if method == "lora":
        return random_adapters(base, count, 16, seed)
    gen = torch.Generator().manual_seed(seed)
    shapes, dtype = base.signature.linear_shapes, base.backend.dtype
    config = base.model.config
    result = []
    for i in range(count):
        if method == "ia3":
            ia3 = {}
            for module, (out_features, in_features) in shapes.items():
                leaf = module.rsplit(".", 1)[-1]
                if leaf in ("k_proj", "v_proj", "down_proj"):
                    on_input = leaf == "down_proj"
                    size = in_features if on_input else out_features
                    vector = (1 + 0.2 * (torch.rand(size, generator=gen) - 0.5)).to(dtype)
                    ia3[module] = IA3Scale(vector=vector, on_input=on_input)
            result.append(_adapter(f"ia3-{i}", ia3=ia3))
        elif method == "freeze":
            last = {f"model.layers.{config.num_hidden_layers - 1 - k}.mlp." for k in range(FREEZE_LAST_K)}
            dense = {}
            for module in shapes:
                if any(module.startswith(prefix) for prefix in last):
                    weight = base.model.get_submodule(module).base.weight
                    noise = torch.randn(weight.shape, generator=gen).to(dtype) * 0.01
                    dense[module] = DenseWeights(weight=weight + noise, bias=None)
            result.append(_adapter(f"freeze-{i}", dense=dense))
        elif method == "prompt":
            tokens = (torch.randn(VIRTUAL_TOKENS, config.hidden_size, generator=gen) * 0.02).to(dtype)
            result.append(_adapter(f"prompt-{i}", virtual_tokens=tokens))
        elif method == "prefix":
            kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
            head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
            prefix = tuple((torch.randn(kv_heads, VIRTUAL_TOKENS, head_dim, generator=gen).to(dtype),
                            torch.randn(kv_heads, VIRTUAL_TOKENS, head_dim, generator=gen).to(dtype))
                           for _ in range(config.num_hidden_layers))
            result.append(_adapter(f"prefix-{i}", prefix=prefix))
        else:
            raise ValueError(method)
    return result


def main() -> None:
    args = parse_args()
    torch.set_num_threads(1)  # the main thread stays single-threaded; the scheduler thread gets args.threads
    backend = Backend(torch.device("cpu"), torch.float32)
    base = load_base(resolve_base(args.base, Path(args.cache_dir)), backend, lora_kernel="stacked",
                     lora_slots=max(32, args.adapters))
    prompts = make_prompts(base.tokenizer, args.requests, args.prompt_tokens)
    pools = {method: make_adapters(base, method, args.adapters, seed) for seed, method in enumerate(METHODS)}
    pools["mixed"] = [a for group in zip(*(pools[m] for m in METHODS)) for a in group]
    rows = {"base": [None] * args.requests}
    rows.update({name: [pool[i % len(pool)] for i in range(args.requests)] for name, pool in pools.items()})
    print(f"# {args.base}, fp32 CPU, {args.threads} threads, {args.requests} requests x {args.prompt_tokens} prompt + "
          f"{args.new_tokens} new tokens, {args.concurrency} at a time, {args.adapters} adapters per method", flush=True)
    for name, chosen in rows.items():  # warm-up: every path once, adapters in their slots
        run_engine(base, prompts[:args.concurrency], chosen[:args.concurrency], args.concurrency, 4, args.threads,
                   VIRTUAL_TOKENS)
    totals: dict[str, dict[str, float]] = {}
    per_round = max(args.concurrency, args.requests // args.rounds)
    for lo in range(0, args.requests, per_round):  # rounds interleave the systems against a noisy machine
        part = slice(lo, lo + per_round)
        for name, chosen in rows.items():
            result = run_engine(base, prompts[part], chosen[part], args.concurrency, args.new_tokens, args.threads,
                                VIRTUAL_TOKENS)
            total = totals.setdefault(name, {"tokens": 0, "seconds": 0.0})
            total["tokens"] += result["tokens"]
            total["seconds"] += result["seconds"]
            print(f"round {lo // per_round + 1}: {name} {result['tokens_per_s']:.1f} tok/s", flush=True)
    tps = {name: t["tokens"] / t["seconds"] for name, t in totals.items()}
    print("| adapters in the batch | tok/s | / base only |\n|---|---|---|")
    for name, value in tps.items():
        print(f"| {name} | {value:.1f} | {value / tps['base']:.3f} |")
    print(json.dumps({"tokens_per_s": {k: round(v, 2) for k, v in tps.items()},
                      "ratio_to_base": {k: round(v / tps["base"], 3) for k, v in tps.items()}}))


if __name__ == "__main__":
    main()
