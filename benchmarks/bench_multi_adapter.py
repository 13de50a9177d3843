"""Multi-adapter throughput, side by side in ONE run on the same model, prompts and adapters.

(a) our engine, base only          (b) our engine, N distinct adapters mixed in the batch
(c) PEFT, mixed-adapter batches (`adapter_names=`)   (d) PEFT, one request at a time (`set_adapter`)

Every request has `--prompt-tokens` real prompt tokens and generates exactly `--new-tokens` (eos ignored),
`--concurrency` at a time. The last line printed is JSON with tokens/s and the ratios b/a, b/c, b/d.
`--sweep` adds our engine with 1, 8, 64, 512 distinct adapters chosen with zipf popularity, most of
them outside the device slots (the CPU tier), with slot loads and evictions.

    python benchmarks/bench_multi_adapter.py                 # the issue's setting (about 6 minutes here)
    python benchmarks/bench_multi_adapter.py --requests 16   # quicker
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import tempfile
import threading
import time
from pathlib import Path

import torch

from adapters import read_adapter_folder, resolve_base
from server.engine.backend import Backend
from server.engine.base_model import load_base
from server.engine.loaded import LoadedAdapter, load_adapter
from server.engine.sampling import SamplingParams
from server.engine.scheduler import GenerationRequest, Scheduler, SchedulerLimits

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
ZIPF_EXPONENT = 1.1
SWEEP = (1, 8, 64, 512)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", default="smollm2-135m")
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--adapters", type=int, default=8, help="distinct adapters in (b) and (c)")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--sequential-requests", type=int, default=8, help="requests timed for (d); it is slow")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=4, help="interleave the systems over this many rounds")
    p.add_argument("--sweep", action="store_true")
    p.add_argument("--skip-peft", action="store_true")
    p.add_argument("--cache-dir", default=os.environ.get("LORAPLEX_CACHE", str(Path.home() / ".cache" / "loraplex")))
    return p.parse_args()


def make_prompts(tokenizer, n: int, length: int, seed: int = 0) -> list[list[int]]:
    """n prompts of exactly `length` tokens, cut from real English text (chatterbot's answers)."""
    import importlib.util

    import yaml

    root = Path(list(importlib.util.find_spec("chatterbot_corpus").submodule_search_locations)[0]) / "data" / "english"
    text = []
    for path in sorted(root.glob("*.yml")):
        for convo in yaml.safe_load(path.read_text()).get("conversations", []):
            text.extend(str(t) for t in convo)
    ids = tokenizer(" ".join(text))["input_ids"]
    rng = random.Random(seed)
    starts = [rng.randrange(0, len(ids) - length) for _ in range(n)]
    return [ids[s:s + length] for s in starts]


def make_peft_adapters(base_path: Path, count: int, rank: int, out_dir: Path) -> list[Path]:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS,
                                                  init_lora_weights=False))
    paths = []
    for i in range(count):
        torch.manual_seed(i)
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if "lora_" in name:
                    param.normal_(0, 0.02)
        path = out_dir / f"adapter-{i}"
        peft_model.save_pretrained(path)
        paths.append(path)
    return paths


def run_engine(base, prompts, adapters: list[LoadedAdapter | None], concurrency: int, new_tokens: int,
               threads: int, extra_len: int = 0) -> dict:
    """Submit every request at once; the scheduler runs `concurrency` at a time. -> tokens/s and stats.
    `extra_len`: KV positions an adapter adds in front of the prompt (prompt-learning virtual tokens).

    `tokens_per_s` is every generated token over the whole run (start-up, adapter loads and prefills
    included). `decode_tokens_per_s` counts only decode steps: each request's tokens after its first,
    over the time at least one request was between its first and its last token (the union of those
    intervals, so prefills and adapter loads between sequential requests are left out, and a prefill that
    runs while other requests decode is counted against decode)."""
    limits = SchedulerLimits(max_running=concurrency, max_waiting=len(prompts) + 1,
                             max_len=len(prompts[0]) + new_tokens + 1 + extra_len, max_adapters_per_batch=concurrency)
    sched = Scheduler(base, limits, threading.Lock(), threads=threads)
    done = threading.Semaphore(0)
    counts = [0] * len(prompts)
    first: list[float | None] = [None] * len(prompts)
    last: list[float | None] = [None] * len(prompts)

    errors: list[BaseException] = []

    def emitter(i):
        def emit(item):
            if isinstance(item, BaseException):  # ends the request: raised in the caller, not the engine thread
                errors.append(item)
                done.release()
                return
            now = time.perf_counter()
            counts[i] += 1
            first[i] = now if first[i] is None else first[i]
            last[i] = now
            if item.finish_reason is not None:
                done.release()
        return emit

    params = SamplingParams(max_tokens=new_tokens, ignore_eos=True)
    started = time.perf_counter()
    sched.start()
    for i, (prompt, adapter) in enumerate(zip(prompts, adapters)):
        sched.submit(GenerationRequest(list(prompt), params, adapter, emit=emitter(i)))
    for _ in prompts:
        done.acquire()
        if errors:
            break
    elapsed = time.perf_counter() - started
    sched.stop()
    if errors:
        raise RuntimeError(f"a request failed in the engine: {errors[0]!r}") from errors[0]
    assert all(c == new_tokens for c in counts), counts
    decode_s = union_seconds(list(zip(first, last)))
    decode_tokens = sum(c - 1 for c in counts)
    return {"tokens": sum(counts), "seconds": elapsed, "tokens_per_s": sum(counts) / elapsed,
            "decode_seconds": decode_s, "decode_tokens_per_s": decode_tokens / decode_s if decode_s else None}


def union_seconds(intervals: list[tuple[float, float]]) -> float:
    """The length of the union of [start, end] intervals."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end <= reach:
            continue
        total += end - max(start, reach)
        reach = end
    return total


def run_peft_batched(model, prompts, names: list[str], concurrency: int, new_tokens: int) -> dict:
    tokens, started = 0, time.perf_counter()
    for lo in range(0, len(prompts), concurrency):
        batch = torch.tensor(prompts[lo:lo + concurrency])
        with torch.no_grad():
            out = model.generate(input_ids=batch, attention_mask=torch.ones_like(batch), do_sample=False,
                                 max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                 adapter_names=names[lo:lo + concurrency], pad_token_id=0)
        tokens += (out.shape[1] - batch.shape[1]) * batch.shape[0]
    elapsed = time.perf_counter() - started
    return {"tokens": tokens, "seconds": elapsed, "tokens_per_s": tokens / elapsed}


def run_peft_sequential(model, prompts, names: list[str], new_tokens: int) -> dict:
    tokens, started = 0, time.perf_counter()
    for prompt, name in zip(prompts, names):
        model.set_adapter(name)
        ids = torch.tensor([prompt])
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0)
        tokens += out.shape[1] - ids.shape[1]
    elapsed = time.perf_counter() - started
    return {"tokens": tokens, "seconds": elapsed, "tokens_per_s": tokens / elapsed}


def peft_worker(conn, base_path: str, paths: list[str], threads: int) -> None:
    """PEFT (c, d) in a process of its own: two threads with multi-threaded torch in one process slow each
    other (server/engine/worker.py), so the engine's scheduler thread is the only one in the main process."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    model = PeftModel.from_pretrained(model, paths[0], adapter_name="adapter-0").eval()
    for i, path in enumerate(paths[1:], start=1):
        model.load_adapter(path, adapter_name=f"adapter-{i}")
    runs = {"batched": run_peft_batched, "sequential": run_peft_sequential}
    conn.send("ready")
    while (message := conn.recv()) is not None:
        kind, args = message
        conn.send(runs[kind](model, *args))


def random_adapters(base, count: int, rank: int, seed: int) -> list[LoadedAdapter]:
    """Adapters built in memory (the sweep needs hundreds; saving each through PEFT would dominate)."""
    from adapters import LoraWeights

    gen = torch.Generator().manual_seed(seed)
    dtype = base.backend.dtype
    shapes = base.signature.linear_shapes
    modules = [m for m in shapes if m.rsplit(".", 1)[-1] in TARGETS]
    adapters = []
    for i in range(count):
        lora = {m: LoraWeights(a=(torch.randn(rank, shapes[m][1], generator=gen) * 0.02).to(dtype),
                               b=(torch.randn(shapes[m][0], rank, generator=gen) * 0.02).to(dtype), scaling=2.0)
                for m in modules}
        adapters.append(LoadedAdapter(f"sweep-{i}", 1, "completion", Path("."), rank, lora))
    return adapters


def main() -> None:
    args = parse_args()
    torch.set_num_threads(1)  # the main thread stays single-threaded; the scheduler thread gets args.threads
    backend = Backend(torch.device("cpu"), torch.float32)
    prepared = resolve_base(args.base, Path(args.cache_dir))
    base = load_base(prepared, backend, lora_kernel="stacked", lora_slots=max(32, args.adapters))
    prompts = make_prompts(base.tokenizer, args.requests, args.prompt_tokens)
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_peft_adapters(prepared.path, args.adapters, args.rank, Path(tmp))
        loaded = [load_adapter(f"adapter-{i}", 1, read_adapter_folder(p), backend.device, backend.dtype)
                  for i, p in enumerate(paths)]
        mixed = [loaded[i % len(loaded)] for i in range(args.requests)]
        names = [f"adapter-{i % len(loaded)}" for i in range(args.requests)]
        print(f"# {args.base}, fp32 CPU, {args.threads} threads, {args.requests} requests x {args.prompt_tokens} prompt"
              f" + {args.new_tokens} new tokens, {args.concurrency} at a time, {args.adapters} adapters rank {args.rank}"
              f" on {','.join(TARGETS)}", flush=True)
        for warm in ([None] * args.concurrency, mixed[:args.concurrency]):  # warm-up, adapters in slots (as PEFT's)
            run_engine(base, prompts[:args.concurrency], warm, args.concurrency, 4, args.threads)
        peft = None
        if not args.skip_peft:
            peft, child = multiprocessing.get_context("spawn").Pipe()
            process = multiprocessing.get_context("spawn").Process(
                target=peft_worker, args=(child, str(prepared.path), [str(p) for p in paths], args.threads))
            process.start()
            assert peft.recv() == "ready"
            peft.send(("batched", (prompts[:args.concurrency], names[:args.concurrency], args.concurrency, 4)))
            peft.recv()  # warm-up
        # Rounds interleave the systems, so a slow spell of this (shared, noisy) machine hits them alike.
        per_round = max(args.concurrency, args.requests // args.rounds // args.concurrency * args.concurrency)
        sequential_per_round = max(1, args.sequential_requests // args.rounds)
        for lo in range(0, args.requests, per_round):
            part = slice(lo, lo + per_round)
            seq = slice(lo, lo + sequential_per_round)
            runs = {
                "a_engine_base": lambda: run_engine(base, prompts[part], [None] * len(prompts[part]),
                                                    args.concurrency, args.new_tokens, args.threads),
                "b_engine_mixed": lambda: run_engine(base, prompts[part], mixed[part], args.concurrency,
                                                     args.new_tokens, args.threads),
            }
            if peft is not None:
                runs["c_peft_mixed_batch"] = lambda: _ask(peft, "batched", (prompts[part], names[part],
                                                                             args.concurrency, args.new_tokens))
                runs["d_peft_sequential"] = lambda: _ask(peft, "sequential", (prompts[seq], names[seq],
                                                                               args.new_tokens))
            for key, run in runs.items():
                result = run()
                total = results.setdefault(key, {"tokens": 0, "seconds": 0.0})
                total["tokens"] += result["tokens"]
                total["seconds"] += result["seconds"]
                total["tokens_per_s"] = total["tokens"] / total["seconds"]
                print(f"round {lo // per_round + 1}: {key} {result['tokens'] / result['seconds']:.1f} tok/s", flush=True)
        if peft is not None:
            peft.send(None)
            process.join()
        for key, label in (("a_engine_base", "a) engine, base only"),
                           ("b_engine_mixed", f"b) engine, {args.adapters} adapters mixed"),
                           ("c_peft_mixed_batch", "c) PEFT mixed batch (adapter_names=)"),
                           ("d_peft_sequential", "d) PEFT one at a time (set_adapter)")):
            if key in results:
                print(f"{label}: {results[key]['tokens_per_s']:.1f} tok/s ({results[key]['tokens']} tokens in "
                      f"{results[key]['seconds']:.1f} s)", flush=True)
    if args.sweep:
        rng = random.Random(0)
        for count in SWEEP:
            pool = random_adapters(base, count, args.rank, seed=count)
            weights = [1 / (i + 1) ** ZIPF_EXPONENT for i in range(count)]
            chosen = rng.choices(pool, weights=weights, k=args.requests)
            slots = base.active.slots
            before = (slots.loads, slots.evictions)
            result = run_engine(base, prompts, chosen, args.concurrency, args.new_tokens, args.threads)
            result.update(distinct_in_trace=len({id(a) for a in chosen}), device_slots=slots.num_slots,
                          slot_loads=slots.loads - before[0], slot_evictions=slots.evictions - before[1])
            results[f"sweep_{count}"] = result
            print(f"sweep {count} adapters (zipf):", result, flush=True)
    tps = {k: v["tokens_per_s"] for k, v in results.items()}
    summary = {"tokens_per_s": {k: round(v, 2) for k, v in tps.items()},
               "b/a": round(tps["b_engine_mixed"] / tps["a_engine_base"], 3)}
    if "c_peft_mixed_batch" in tps:
        summary["b/c"] = round(tps["b_engine_mixed"] / tps["c_peft_mixed_batch"], 3)
        summary["b/d"] = round(tps["b_engine_mixed"] / tps["d_peft_sequential"], 3)
    print(json.dumps(summary))


def _ask(conn, kind: str, args: tuple) -> dict:
    conn.send((kind, args))
    return conn.recv()


if __name__ == "__main__":
    main()
