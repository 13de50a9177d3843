"""Quantized bases side by side in ONE run: fp32, bf16, int8, int4 (and optionally nf4) on smollm2-135m.

Each mode runs in a process of its own (resident memory is that process's, and no thread of one mode
slows another's), one after the other, with the same prompts, adapters and text:
- weight bytes the base holds (quantized matrices + the tensors left as they were) and the growth of the
  process's resident memory over loading the base (the fp32 path also keeps oneDNN-packed copies);
- perplexity on held-out real text (chatterbot answers and rotten-tomatoes reviews, `--ppl-blocks` blocks
  of `--block` tokens from each, teacher-forced) and greedy next-token agreement with the fp32 base
  (argmax at every position equal to fp32's);
- generation tokens/s (`--prompt-tokens` prompt, `--new-tokens` new, eos ignored) at batch 1 and at
  batch 8, each row on its own rank-16 adapter (8 distinct adapters mixed), and batch 8 base only, twice:
  `tokens_per_s` over the whole run (prefills, adapter loads and start-up included) and
  `decode_tokens_per_s` over decode steps only (bench_multi_adapter.run_engine says how);
- `--sentiment`: the minilm-l6 sentiment example adapter's accuracy on its held-out rows on the fp32
  and the int8 encoder base.
Ratios against the fp32 and the bf16 rows are printed; the JSON goes to benchmarks/results/.

    python benchmarks/bench_quant.py                       # about 10 minutes on 2 cores
    python benchmarks/bench_quant.py --modes none,int4 --requests 4
    python benchmarks/bench_quant.py --kernels             # the per-kernel sweep quant_kernels.py cites
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_multi_adapter import make_prompts, random_adapters, run_engine  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
MODES = {"none": ("float32", "none"), "bf16": ("bfloat16", "none"), "int8": ("float32", "int8"),
         "int4": ("float32", "int4"), "nf4": ("float32", "nf4")}
ADAPTERS = 8
RANK = 16
TEXT_SEED = 1234
SENTIMENT = Path(__file__).resolve().parents[1] / "examples" / "adapters" / "sentiment"
CLASSIFY_BATCH = 64
KERNEL_PASSES = 6  # --kernels: passes per kind and row count, the first a warm-up


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", default="smollm2-135m")
    p.add_argument("--modes", default="none,bf16,int8,int4", help=f"comma list of {', '.join(MODES)}")
    p.add_argument("--requests", type=int, default=8, help="requests per speed run (batch 1 and batch 8)")
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=2, help="speed runs per setting; the best is kept")
    p.add_argument("--block", type=int, default=128, help="tokens per perplexity block")
    p.add_argument("--ppl-blocks", type=int, default=16, help="blocks from each text source")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--sentiment", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--kernels", action="store_true", help="only the kernel sweep over SmolLM2's matrix shapes")
    p.add_argument("--kernel-rows", default="1,8,64", help="--kernels: comma list of row counts")
    p.add_argument("--tag", default="", help="appended to the results file's name (quant_<date>_<tag>.json)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--scratch", help=argparse.SUPPRESS)
    p.add_argument("--cache-dir", default=os.environ.get("LORAPLEX_CACHE", str(Path.home() / ".cache" / "loraplex")))
    return p.parse_args()


def rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def load(args, mode: str, base_name: str):
    from adapters import resolve_base
    from server.engine.backend import choose_backend
    from server.engine.base_model import load_base

    dtype, quant = MODES[mode]
    prepared = resolve_base(base_name, Path(args.cache_dir))
    before = rss_bytes()
    started = time.perf_counter()
    base = load_base(prepared, choose_backend("cpu", dtype, quant), lora_slots=max(32, ADAPTERS))
    load_s = time.perf_counter() - started
    weight = base.quant.weight_bytes if base.quant else sum(
        t.numel() * t.element_size() for t in (*base.model.parameters(), *base.model.buffers()))
    return base, {"load_s": round(load_s, 1), "weight_bytes": weight, "rss_growth_bytes": rss_bytes() - before}


def text_blocks(tokenizer, block: int, count: int) -> list[list[int]]:
    """`count` blocks of `block` tokens from chatterbot's answers and as many from rotten-tomatoes reviews,
    at seeded positions (the same in every mode)."""
    from training.data import load_dataset

    sources = {
        "chatterbot": " ".join(e.answer for e in load_dataset("chatterbot", "completion").examples),
        "rotten-tomatoes": " ".join(e.text for e in load_dataset("rotten-tomatoes", "classification").examples),
    }
    rng = random.Random(TEXT_SEED)
    blocks = []
    for text in sources.values():
        ids = tokenizer(text)["input_ids"]
        blocks += [ids[s:s + block] for s in (rng.randrange(0, len(ids) - block) for _ in range(count))]
    return blocks


@torch.inference_mode()
def quality(base, blocks: list[list[int]]) -> tuple[float, torch.Tensor]:
    """(perplexity over every next-token prediction, argmax [blocks, block - 1])."""
    nll, count, argmax = 0.0, 0, []
    for block in blocks:
        ids = torch.tensor([block])
        logits = base.model(input_ids=ids).logits[0, :-1].float()
        target = ids[0, 1:]
        nll += torch.nn.functional.cross_entropy(logits, target, reduction="sum").item()
        count += target.numel()
        argmax.append(logits.argmax(-1))
    return float(torch.exp(torch.tensor(nll / count))), torch.stack(argmax)


def speed(args, base) -> dict:
    prompts = make_prompts(base.tokenizer, args.requests, args.prompt_tokens)
    adapters = random_adapters(base, ADAPTERS, RANK, seed=0)
    mixed = [adapters[i % ADAPTERS] for i in range(len(prompts))]
    settings = {"batch1_mixed": (1, mixed), "batch8_base": (8, [None] * len(prompts)), "batch8_mixed": (8, mixed)}
    run_engine(base, prompts[:2], mixed[:2], 2, 4, args.threads)  # warm-up: first slot loads, first kernels
    out: dict = {"tokens_per_s": {}, "decode_tokens_per_s": {}}
    for name, (concurrency, rows) in settings.items():
        runs = [run_engine(base, prompts, rows, concurrency, args.new_tokens, args.threads) for _ in range(args.rounds)]
        for key in out:
            out[key][name] = round(max(r[key] for r in runs), 2)
    return out


@torch.inference_mode()
def sentiment_accuracy(args, mode: str) -> dict:
    from adapters import read_adapter_folder
    from server.engine.classify import classify_texts
    from server.engine.loaded import load_adapter
    from training.config import TrainConfig
    from training.data import load_dataset, relabel, split_dataset

    folder = read_adapter_folder(SENTIMENT)
    manifest = folder.manifest
    config = TrainConfig.from_manifest(manifest.train_config, out=SENTIMENT)
    dataset = relabel(load_dataset(config.data, "classification"), tuple(manifest.labels))
    rows = split_dataset(dataset, config.val_fraction, config.split_seed, config.eval_rows).validation.examples
    base, memory = load(args, mode, manifest.base_name)
    adapter = load_adapter("sentiment", 1, folder, base.backend.device, base.backend.dtype)
    max_length = config.resolved("classification", ()).max_length
    correct = 0
    for lo in range(0, len(rows), CLASSIFY_BATCH):
        batch = rows[lo:lo + CLASSIFY_BATCH]
        got = classify_texts(base, [r.text for r in batch], adapter, max_length)
        correct += sum(g.label == manifest.labels[r.label] for g, r in zip(got, batch))
    return {"rows": len(rows), "accuracy": round(correct / len(rows), 4), **memory}


def worker(args) -> None:
    torch.set_num_threads(args.threads)
    scratch = Path(args.scratch)
    if args.worker.startswith("sentiment-"):
        result = sentiment_accuracy(args, args.worker.removeprefix("sentiment-"))
    else:
        base, result = load(args, args.worker, args.base)
        # quality first, in the main thread: once the scheduler thread has run multi-threaded torch, this
        # thread's ops slow down many times over (server/engine/worker.py says why)
        ppl, argmax = quality(base, text_blocks(base.tokenizer, args.block, args.ppl_blocks))
        torch.set_num_threads(1)  # the scheduler thread gets args.threads
        result.update(speed(args, base))
        result["perplexity"] = round(ppl, 4)
        reference = scratch / "argmax-none.pt"
        if args.worker == "none":
            torch.save(argmax, reference)
        if reference.is_file():
            result["greedy_agreement"] = round((argmax == torch.load(reference)).float().mean().item(), 4)
        result["tokens_scored"] = int(argmax.numel())
    (scratch / f"{args.worker}.json").write_text(json.dumps(result))


def run_worker(args, name: str, scratch: Path) -> dict:
    command = [sys.executable, __file__, "--worker", name, "--scratch", str(scratch), "--base", args.base,
               "--requests", str(args.requests), "--prompt-tokens", str(args.prompt_tokens),
               "--new-tokens", str(args.new_tokens), "--rounds", str(args.rounds), "--block", str(args.block),
               "--ppl-blocks", str(args.ppl_blocks), "--threads", str(args.threads), "--cache-dir", args.cache_dir]
    subprocess.run(command, check=True)
    result = json.loads((scratch / f"{name}.json").read_text())
    print(name, json.dumps(result), flush=True)
    return result


def ratios(results: dict) -> dict:
    out = {}
    fp32, bf16 = results.get("none"), results.get("bf16")
    for mode, r in results.items():
        row = {}
        if fp32:
            row["weight_bytes_over_fp32"] = round(r["weight_bytes"] / fp32["weight_bytes"], 3)
            row["perplexity_change"] = round(r["perplexity"] / fp32["perplexity"] - 1, 4)
        for measure, prefix in (("tokens_per_s", ""), ("decode_tokens_per_s", "decode_")):
            speed_ = r.get(measure)
            if not speed_:
                continue
            row[f"{prefix}mixed_over_base_batch8"] = round(speed_["batch8_mixed"] / speed_["batch8_base"], 3)
            if bf16:
                for key in ("batch1_mixed", "batch8_mixed"):
                    row[f"{prefix}{key}_over_bf16"] = round(speed_[key] / bf16[measure][key], 3)
        out[mode] = row
    return out


def kernel_sweep(threads: int, rows_list: tuple[int, ...] = (1, 8, 64)) -> None:
    """One pass over SmolLM2-135M's 211 matrix shapes (30 layers of q, k, v, o, gate, up, down + the head)."""
    from adapters.quantized import quantize_int4, quantize_int8, quantize_int8_channel
    from server.engine.backend import linear_kernel_for
    from server.engine.native import qgemm_library
    from server.engine.quant_kernels import TorchInt4, TorchInt8, TorchInt8Channel
    from server.engine.quant_native import NativeInt4, NativeInt8, NativeInt8Channel

    torch.set_num_threads(threads)
    lib = qgemm_library()
    shapes = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)] * 30
    shapes.append((49152, 576))
    weights = [torch.randn(n, k) * 0.02 for n, k in shapes]
    fp32_linear, fp32_pack = linear_kernel_for(torch.device("cpu"), torch.float32)
    bf16_linear, bf16_pack = linear_kernel_for(torch.device("cpu"), torch.bfloat16)
    makers = {
        "fp32": lambda w: (lambda x, p=fp32_pack(w): fp32_linear(x, p, None)),
        "bf16": lambda w: (lambda x, p=bf16_pack(w.bfloat16()): bf16_linear(x.bfloat16(), p, None)),
        "int8": lambda w: (lambda x, m=TorchInt8(**quantize_int8(w, 64), group_size=64): m.matmul(x, None)),
        "int8_channel": lambda w: (lambda x, m=TorchInt8Channel(**quantize_int8_channel(w)): m.matmul(x, None)),
        "int4": lambda w: (lambda x, m=TorchInt4(**quantize_int4(w), group_size=32): m.matmul(x, None)),
    }
    if lib is not None:  # the native kernels, never the dequantize fallback (dequant_rows past every row count)
        never = 1 << 30
        makers.update({
            "native_int8": lambda w: (lambda x, m=NativeInt8(lib, **quantize_int8(w, 64), group_size=64,
                                                               dequant_rows=never): m.matmul(x, None)),
            "native_int8_channel": lambda w: (lambda x, m=NativeInt8Channel(lib, **quantize_int8_channel(w),
                                                                             dequant_rows=never): m.matmul(x, None)),
            "native_int4": lambda w: (lambda x, m=NativeInt4(lib, **quantize_int4(w), group_size=32,
                                                               dequant_rows=never): m.matmul(x, None)),
            "dequant_int8": lambda w: (lambda x, m=NativeInt8(lib, **quantize_int8(w, 64), group_size=64,
                                                                dequant_rows=0): m.matmul(x, None)),
        })
    built = {name: [make(w) for w in weights] for name, make in makers.items()}
    for rows in rows_list:
        inputs = {k: torch.randn(rows, k) for k in (576, 1536)}
        passes: dict[str, list[float]] = {name: [] for name in built}
        for _ in range(KERNEL_PASSES):  # the kinds' passes interleaved, so machine noise hits them alike
            for name, fns in built.items():
                started = time.perf_counter()
                for fn, (_, k) in zip(fns, shapes):
                    fn(inputs[k])
                passes[name].append(time.perf_counter() - started)
        timings = {name: round(sorted(times[1:])[len(times[1:]) // 2] * 1000, 1) for name, times in passes.items()}
        print(f"{rows} rows, median ms per pass (of {KERNEL_PASSES - 1} after a warm-up):", timings,
              {k: round(timings["fp32"] / v, 2) for k, v in timings.items()}, flush=True)


def main() -> None:
    args = parse_args()
    if args.worker:
        worker(args)
        return
    if args.kernels:
        kernel_sweep(args.threads, tuple(int(r) for r in args.kernel_rows.split(",")))
        return
    modes = [m for m in args.modes.split(",") if m]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        sys.exit(f"unknown modes {unknown}; choose from {', '.join(MODES)}")
    if "none" in modes:
        modes.remove("none")
        modes.insert(0, "none")  # the agreement reference runs first
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in modes:
            results[mode] = run_worker(args, mode, Path(tmp))
        sentiment = {}
        if args.sentiment:
            for mode in ("none", "int8"):
                sentiment[mode] = run_worker(args, f"sentiment-{mode}", Path(tmp))
    summary = {"base": args.base, "settings": {k: v for k, v in vars(args).items() if k not in ("worker", "scratch", "tag")},
               "results": results, "ratios": ratios(results), "sentiment": sentiment,
               "torch": torch.__version__, "threads": args.threads}
    if sentiment:
        summary["sentiment_accuracy_delta_int8"] = round(sentiment["int8"]["accuracy"] - sentiment["none"]["accuracy"], 4)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"quant_{date.today().isoformat()}{'_' + args.tag if args.tag else ''}.json"
    out.write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps({"ratios": summary["ratios"], "sentiment": summary.get("sentiment_accuracy_delta_int8")}))
    print(f"written to {out}")


if __name__ == "__main__":
    main()
