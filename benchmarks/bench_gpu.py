"""GPU throughput of the engine against PEFT and the decode roofline, in ONE run on one random-weight model.

The subject is a 1.24 B Llama-shaped model with random weights (hidden 2048, 16 layers, 32 heads, 8 KV
heads, intermediate 8192, vocab 128256, tied embeddings), bf16, batch 32, 128 prompt / 128 new tokens
(eos ignored). Weight values do not change the speed, so no real checkpoint is needed. Systems:

(a) our engine, base only      (b) our engine, N distinct rank-r adapters mixed in the batch (one per row)
(c) PEFT, mixed-adapter batch (`generate(..., adapter_names=)`)   (d) PEFT, one request at a time
(e) our engine over a registry of many adapters (default 1,000, ranks drawn from 8/16/32/64, zipf
    popularity with exponent 1.1): 32 device slots (max_loras), 64 adapters in the memory tier
    (max_cpu_loras), the rest only as folders on disk (in the OS page cache, i.e. host memory), re-read
    on a miss; requests acquire their adapter in a thread pool as the HTTP routes do.

(a)-(d) run interleaved over `--rounds` (one batch of each per round; (d) `--sequential-per-round`
requests per round, it is slow); (e) runs after them. Adapters target every linear of the decoder layers
(q,k,v,o,gate,up,down: what PEFT's "all-linear" picks for a Llama; `--targets` to change), with random
nonzero A and B so their deltas are real.

The roofline: a decode step reads every weight once plus the batch's KV cache at the mean context
(prompt + new/2); over the measured device-to-device copy bandwidth ((read + write bytes) / time of a
large copy) that bounds the steps per second, times the batch is tokens/s.

The last line printed is JSON: the GPU, bandwidth, roofline, each system's tokens/s (an "error" in place of
a system that failed), and the ratios b/a, b/c, e/a (generated tokens over wall time, prefills included)
and b/roofline (b's decode-only tokens/s: the roofline bounds decode steps).

    python benchmarks/bench_gpu.py                          # the issue's setting, on CUDA
    python benchmarks/bench_gpu.py --tiny --device cpu      # a small model on the CPU (the CI smoke test)
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import random
import signal
import tempfile
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import torch

from adapters import PreparedBase, read_adapter_folder, validate_against_base
from bench_multi_adapter import union_seconds  # this folder is on the path when run as a script
from adapters.fingerprint import fingerprint_base_folder
from server.engine.backend import choose_backend
from server.engine.base_model import BaseModel, load_base
from server.engine.loaded import LoadedAdapter, load_adapter
from server.engine.sampling import SamplingParams
from server.engine.scheduler import GenerationRequest, Scheduler, SchedulerLimits
from server.registry import AdapterRegistry

RESULTS = Path(__file__).resolve().parent / "results"
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ZIPF_EXPONENT = 1.1  # as bench_multi_adapter.py --sweep
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>")  # ids 0..3 of the synthetic tokenizer
FIRST_ID = len(SPECIAL_TOKENS)  # prompts are random ids from here up
INIT_STD = 0.02  # random LoRA factors: N(0, 0.02), like the model's own init
GOALS = {"b/a": 0.9, "b/roofline": 0.5, "b/c": 100.0, "e/a": 0.85}  # the targets on an H100/H200
SUBMIT_THREADS = 4  # (e): threads acquiring adapters (a miss re-reads a folder), as the routes' threadpool
WARM_TOKENS = 4  # new tokens of each warm-up run

# Sizes: the setting, and a small one that runs on a 2-core CPU in well under a minute.
PRESETS = {
    "full": dict(hidden=2048, layers=16, heads=32, kv_heads=8, intermediate=8192, vocab=128256, batch=32,
                 prompt_tokens=128, new_tokens=128, adapters=32, rank=16, rounds=3, sequential_per_round=1,
                 sweep_adapters=1000, sweep_requests=256, max_loras=32, max_cpu_loras=64, pool_per_rank=4,
                 copy_mib=1024),
    "tiny": dict(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab=512, batch=4,
                 prompt_tokens=16, new_tokens=16, adapters=4, rank=16, rounds=2, sequential_per_round=1,
                 sweep_adapters=40, sweep_requests=16, max_loras=4, max_cpu_loras=8, pool_per_rank=2,
                 copy_mib=16),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"],
                   help="auto: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--tiny", action="store_true", help="small model and requests (CPU smoke test)")
    p.add_argument("--skip-peft", action="store_true", help="leave out (c) and (d)")
    p.add_argument("--skip-sweep", action="store_true", help="leave out (e)")
    p.add_argument("--out", type=Path, help="also write the JSON here (default on CUDA: "
                                            "benchmarks/results/gpu_<date>.json)")
    p.add_argument("--workdir", type=Path, help="where the model and adapter folders go (default: a temp dir)")
    p.add_argument("--targets", default=",".join(ALL_LINEAR), help="modules the adapters target")
    p.add_argument("--sweep-ranks", default="8,16,32,64", help="(e): ranks drawn uniformly per adapter")
    p.add_argument("--run-timeout", type=float, default=600.0, help="seconds one system's run may take")
    p.add_argument("--seed", type=int, default=0)
    for name, value in PRESETS["full"].items():
        p.add_argument(f"--{name.replace('_', '-')}", type=int, help=f"default {value} (tiny: {PRESETS['tiny'][name]})")
    args = p.parse_args(argv)
    for name, value in PRESETS["tiny" if args.tiny else "full"].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.targets = tuple(t for t in args.targets.split(",") if t)
    args.sweep_ranks = tuple(int(r) for r in args.sweep_ranks.split(","))
    if args.dtype == "auto":
        args.dtype = "bfloat16" if args.device == "cuda" else "float32"
    return args


# -- the subject: a random Llama and random adapters, as HF / PEFT folders -----------------------------

def write_tokenizer(folder: Path, vocab_size: int) -> None:
    """A word-level tokenizer with one token per id ("t123"): the engine detokenizes every step, and no
    real tokenizer has this vocab offline. Prompts are random ids, so its vocabulary does not matter."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    vocab.update({f"t{i}": i for i in range(FIRST_ID, vocab_size)})
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                            pad_token="<pad>").save_pretrained(folder)


def write_subject(folder: Path, args: argparse.Namespace) -> dict[str, tuple[int, int]]:
    """Save a random-weight Llama (initialized on the device, saved in `args.dtype`) with its tokenizer;
    -> every linear's (out, in) by module name."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        max_position_embeddings=max(2048, args.prompt_tokens + args.new_tokens + 1), rope_theta=500000.0,
        tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=3,
    )
    torch.manual_seed(args.seed)
    with torch.device(args.device):
        model = LlamaForCausalLM(config)
    model.to(getattr(torch, args.dtype)).eval()
    model.save_pretrained(folder)  # safetensors
    write_tokenizer(folder, args.vocab)
    shapes = {name: (m.out_features, m.in_features) for name, m in model.named_modules()
              if isinstance(m, torch.nn.Linear)}
    del model
    free_memory()
    return shapes


def lora_tensors(shapes: dict[str, tuple[int, int]], targets: tuple[str, ...], rank: int, seed: int,
                 device: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """PEFT's state-dict keys -> random A [r, in] and B [out, r] (drawn on the device: fast), on the CPU."""
    gen = torch.Generator(device=device).manual_seed(seed)
    tensors = {}
    for module, (out_features, in_features) in shapes.items():
        if module.rsplit(".", 1)[-1] not in targets:
            continue
        for part, shape in (("lora_A", (rank, in_features)), ("lora_B", (out_features, rank))):
            value = torch.randn(shape, generator=gen, device=device) * INIT_STD
            tensors[f"base_model.model.{module}.{part}.weight"] = value.to(dtype).cpu()
    return tensors


def write_lora_config(folder: Path, rank: int, targets: tuple[str, ...]) -> None:
    from peft import LoraConfig

    LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=list(targets),
               task_type="CAUSAL_LM").save_pretrained(folder)


def write_adapters(root: Path, shapes, args: argparse.Namespace) -> list[Path]:
    """(b)'s adapters: `args.adapters` distinct PEFT folders of rank `args.rank`."""
    from safetensors.torch import save_file

    paths = []
    for i in range(args.adapters):
        folder = root / f"adapter-{i}"
        write_lora_config(folder, args.rank, args.targets)
        save_file(lora_tensors(shapes, args.targets, args.rank, args.seed + 1 + i, args.device,
                               getattr(torch, args.dtype)), str(folder / "adapter_model.safetensors"))
        paths.append(folder)
    return paths


def write_sweep_folders(root: Path, shapes, args: argparse.Namespace) -> list[tuple[Path, int]]:
    """(e)'s adapters: `args.sweep_adapters` folders, each rank drawn from `args.sweep_ranks`. Their weight
    files are hard links to `pool_per_rank` random files per rank: a thousand folders in seconds and in
    little disk (a rank-64 adapter on all linears of the full subject is 90 MB). The registry still hashes
    and reads each folder's file on every miss, which is the cost being measured."""
    from safetensors.torch import save_file

    rng = random.Random(args.seed)
    pool: dict[int, list[Path]] = {}
    for rank in args.sweep_ranks:
        for k in range(args.pool_per_rank):
            file = root / "pool" / f"r{rank}-{k}.safetensors"
            file.parent.mkdir(parents=True, exist_ok=True)
            save_file(lora_tensors(shapes, args.targets, rank, 10_000 + 100 * rank + k, args.device,
                                   getattr(torch, args.dtype)), str(file))
            pool.setdefault(rank, []).append(file)
        write_lora_config(root / "pool" / f"config-r{rank}", rank, args.targets)
    folders = []
    for i in range(args.sweep_adapters):
        rank = rng.choice(args.sweep_ranks)
        folder = root / f"sweep-{i:04d}"
        folder.mkdir()
        (folder / "adapter_config.json").write_bytes((root / "pool" / f"config-r{rank}" / "adapter_config.json").read_bytes())
        os.link(rng.choice(pool[rank]), folder / "adapter_model.safetensors")
        folders.append((folder, rank))
    return folders


# -- measurements --------------------------------------------------------------------------------------

def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def copy_bandwidth(device: str, mib: int, repeats: int = 20) -> float:
    """Bytes per second of a device-to-device copy of `mib` MiB, counting bytes read and written."""
    src = torch.empty(mib << 20, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    synchronize(device)
    started = time.perf_counter()
    for _ in range(repeats):
        dst.copy_(src)
    synchronize(device)
    elapsed = time.perf_counter() - started
    del src, dst
    free_memory()
    return 2 * (mib << 20) * repeats / elapsed


def kv_bytes_per_token(base: BaseModel) -> int:
    config = base.model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    element = torch.empty((), dtype=base.backend.dtype).element_size()
    return 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * element  # keys and values


def roofline(base: BaseModel, args: argparse.Namespace, bandwidth: float, adapter_bytes: int) -> dict:
    """Decode tokens/s if each step only had to read its bytes at `bandwidth`: the base's weights once and the
    batch's KV cache at the mean context; also with (b)'s adapters read once per step on top."""
    mean_context = args.prompt_tokens + args.new_tokens / 2
    kv_bytes = args.batch * mean_context * kv_bytes_per_token(base)
    step_bytes = base.weight_bytes + kv_bytes
    return {"weight_bytes": base.weight_bytes, "kv_bytes_per_step": int(kv_bytes), "mean_context": mean_context,
            "bytes_per_step": int(step_bytes), "tokens_per_s": args.batch * bandwidth / step_bytes,
            "batch1_tokens_per_s": bandwidth / (base.weight_bytes + mean_context * kv_bytes_per_token(base)),
            "b_adapter_bytes_per_step": adapter_bytes,
            "b_tokens_per_s": args.batch * bandwidth / (step_bytes + adapter_bytes)}


def run_engine(base: BaseModel, prompts: list[list[int]], acquire: Callable[[int], LoadedAdapter | None],
               release: Callable[[LoadedAdapter | None], None], args: argparse.Namespace, *, new_tokens: int,
               max_adapters: int, depth: int, submitters: int = 1) -> dict:
    """Our scheduler, `args.batch` rows at a time, on `prompts`; request i runs with `acquire(i)`, handed to
    `release` when it ends. At most `depth` requests are acquired and not yet finished (a closed loop: all of
    them at once when depth >= len(prompts)); `submitters` threads acquire and submit.

    `tokens_per_s`: every generated token over the whole run (prefills and adapter loads included);
    `decode_tokens_per_s`: tokens after each request's first over the union of the intervals between a
    request's first and last token (bench_multi_adapter.py's measure)."""
    limits = SchedulerLimits(max_running=args.batch, max_waiting=len(prompts) + 1,
                             max_len=args.prompt_tokens + new_tokens + 1, max_adapters_per_batch=max_adapters)
    sched = Scheduler(base, limits, threading.Lock(), threads=torch.get_num_threads())
    room, finished = threading.Semaphore(depth), threading.Semaphore(0)
    counts, first, last = [0] * len(prompts), [0.0] * len(prompts), [0.0] * len(prompts)
    errors: list[BaseException] = []
    params = SamplingParams(max_tokens=new_tokens, ignore_eos=True)

    def end(adapter: LoadedAdapter | None, error: BaseException | None = None) -> None:
        if error is not None:
            errors.append(error)
        release(adapter)
        room.release()
        finished.release()

    def submit(i: int) -> None:
        adapter = None
        try:
            adapter = acquire(i)

            def emit(item, i=i, adapter=adapter):
                if isinstance(item, BaseException):
                    return end(adapter, item)
                now = time.perf_counter()
                first[i] = first[i] or now
                last[i], counts[i] = now, counts[i] + 1
                if item.finish_reason is not None:
                    end(adapter)

            sched.submit(GenerationRequest(list(prompts[i]), params, adapter, emit=emit))
        except Exception as exc:  # noqa: BLE001: reported as this system's error below
            end(adapter, exc)

    started = time.perf_counter()
    sched.start()
    try:
        with ThreadPoolExecutor(submitters) as pool:
            for i in range(len(prompts)):
                if not room.acquire(timeout=args.run_timeout):
                    raise TimeoutError(f"no request finished in {args.run_timeout:g} s")
                pool.submit(submit, i)
            for _ in prompts:
                if not finished.acquire(timeout=args.run_timeout):
                    raise TimeoutError(f"requests still running after {args.run_timeout:g} s")
        elapsed = time.perf_counter() - started
    finally:
        sched.stop()
    if errors:
        raise errors[0]
    if any(c != new_tokens for c in counts):
        raise RuntimeError(f"requests generated {sorted(set(counts))} tokens, not {new_tokens}")
    decode_seconds = union_seconds(list(zip(first, last)))
    return {"requests": len(prompts), "tokens": sum(counts), "seconds": elapsed,
            "decode_tokens": sum(c - 1 for c in counts), "decode_seconds": decode_seconds}


def load_peft(folder: Path, paths: list[Path], args: argparse.Namespace):
    """HF's own Llama with all of (b)'s adapters loaded through PEFT, on the device."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, args.dtype)).to(args.device)
    model = PeftModel.from_pretrained(model, paths[0], adapter_name="adapter-0")
    for i, path in enumerate(paths[1:], start=1):
        model.load_adapter(path, adapter_name=f"adapter-{i}")
    return model.eval()


def run_peft(model, prompts: list[list[int]], names: list[str], args: argparse.Namespace, new_tokens: int,
             batched: bool) -> dict:
    """(c) one `generate` per `args.batch` prompts with `adapter_names=` (a mixed batch), or (d) one request
    at a time after `set_adapter`. Greedy, exactly `new_tokens` new tokens each."""
    step = args.batch if batched else 1
    tokens, started = 0, time.perf_counter()
    for lo in range(0, len(prompts), step):
        ids = torch.tensor(prompts[lo:lo + step], device=args.device)
        extra = {"adapter_names": names[lo:lo + step]} if batched else {}
        if not batched:
            model.set_adapter(names[lo])
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=3, **extra)
        tokens += (out.shape[1] - ids.shape[1]) * ids.shape[0]
    synchronize(args.device)
    return {"requests": len(prompts), "tokens": tokens, "seconds": time.perf_counter() - started}


def build_sweep(base: BaseModel, folders: list[tuple[Path, int]], args: argparse.Namespace) -> AdapterRegistry:
    """A registry holding every sweep folder, `max_cpu_loras` of them in memory (registered in parallel:
    each add hashes and reads its folder)."""
    registry = AdapterRegistry(base, max_adapters=len(folders), max_resident=args.max_cpu_loras)
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda item: registry.add(item[0].name, item[0], startup=True), folders))
    return registry


def run_sweep(base: BaseModel, registry: AdapterRegistry, folders, prompts, args: argparse.Namespace) -> dict:
    """(e): a zipf trace over the registry's adapters, a warm-up trace first (untimed) so the memory tier
    and the slots hold what the popularity puts there."""
    rng = random.Random(args.seed + 1)
    names = [folder.name for folder, _ in folders]
    weights = [1 / (i + 1) ** ZIPF_EXPONENT for i in range(len(names))]
    warm = rng.choices(names, weights=weights, k=2 * args.batch)
    trace = rng.choices(names, weights=weights, k=len(prompts))
    common = dict(max_adapters=args.max_loras, depth=2 * args.batch, submitters=SUBMIT_THREADS)
    run_engine(base, prompts[:len(warm)], lambda i: registry.acquire(warm[i]), registry.release, args,
               new_tokens=WARM_TOKENS, **common)
    slots, tier = base.active.slots, registry.stats
    before = (slots.loads, slots.evictions, tier.hits, tier.misses, tier.evictions)
    result = run_engine(base, prompts, lambda i: registry.acquire(trace[i]), registry.release, args,
                        new_tokens=args.new_tokens, **common)
    rank_of = {folder.name: rank for folder, rank in folders}
    result.update(
        registered=len(names), distinct_in_trace=len(set(trace)), device_slots=slots.num_slots,
        memory_tier=args.max_cpu_loras, resident_at_end=registry.resident_count(),
        slot_loads=slots.loads - before[0], slot_evictions=slots.evictions - before[1],
        tier_hits=tier.hits - before[2], tier_misses=tier.misses - before[3], tier_evictions=tier.evictions - before[4],
        trace_ranks={str(r): sum(rank_of[n] == r for n in trace) for r in args.sweep_ranks},
    )
    return result


# -- the run ---------------------------------------------------------------------------------------------

class Systems:
    """Per-system totals over the rounds; a system that raised keeps its error and is not run again."""

    def __init__(self) -> None:
        self.totals: dict[str, dict] = {}

    def run(self, key: str, fn: Callable[[], dict], label: str = "") -> None:
        entry = self.totals.setdefault(key, {})
        if "error" in entry:
            return
        try:
            result = fn()
        except Exception as exc:  # noqa: BLE001: one system's failure must not lose the others' figures
            traceback.print_exc()
            entry["error"] = f"{type(exc).__name__}: {exc}"
            return
        finally:
            free_memory()
        for name, value in result.items():
            if isinstance(value, (int, float)) and name in ("requests", "tokens", "seconds", "decode_tokens",
                                                            "decode_seconds"):
                entry[name] = entry.get(name, 0) + value
            else:
                entry[name] = value
        entry["tokens_per_s"] = entry["tokens"] / entry["seconds"]
        if entry.get("decode_seconds"):
            entry["decode_tokens_per_s"] = entry["decode_tokens"] / entry["decode_seconds"]
        entry.setdefault("rounds_tokens_per_s", []).append(round(result["tokens"] / result["seconds"], 3))
        print(f"# {key}{label}: {result['tokens'] / result['seconds']:.1f} tok/s", flush=True)

    def fail(self, keys: tuple[str, ...], exc: BaseException) -> None:
        traceback.print_exc()
        for key in keys:
            self.totals[key] = {"error": f"{type(exc).__name__}: {exc}"}


def ratios(systems: dict[str, dict], line: dict) -> dict[str, float | None]:
    def tps(key: str, field: str = "tokens_per_s") -> float | None:
        return systems.get(key, {}).get(field)

    def div(a: float | None, b: float | None) -> float | None:
        return round(a / b, 4) if a is not None and b else None

    return {"b/a": div(tps("b_engine_mixed"), tps("a_engine_base")),
            "b/roofline": div(tps("b_engine_mixed", "decode_tokens_per_s"), line.get("tokens_per_s")),
            "b/c": div(tps("b_engine_mixed"), tps("c_peft_mixed_batch")),
            "e/a": div(tps("e_engine_zipf_sweep"), tps("a_engine_base"))}


def versions() -> dict[str, str]:
    import peft
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "python": platform.python_version()}


class Stopped(BaseException):
    """SIGTERM (the device script's `timeout`): report what was measured until then. A BaseException, so
    that a system's `except Exception` does not take it for that system's failure."""


def _on_sigterm(signum, frame) -> None:
    raise Stopped()


def measure(args: argparse.Namespace, systems: Systems, report: dict) -> None:
    """Build the subject, then run every system into `systems`; the bandwidth, roofline and parameter count
    go into `report` as soon as they are known."""
    bandwidth = copy_bandwidth(args.device, args.copy_mib)
    report["copy_bandwidth_gb_s"] = round(bandwidth / 1e9, 2)
    print(f"# copy bandwidth {bandwidth / 1e9:.1f} GB/s", flush=True)
    rng = random.Random(args.seed)
    count = args.batch * args.rounds
    prompts = [[rng.randrange(FIRST_ID, args.vocab) for _ in range(args.prompt_tokens)]
               for _ in range(max(count, args.sweep_requests))]
    with tempfile.TemporaryDirectory(prefix="bench_gpu-", dir=args.workdir) as tmp:
        root = Path(tmp)
        started = time.perf_counter()
        shapes = write_subject(root / "base", args)
        paths = write_adapters(root / "adapters", shapes, args)
        backend = choose_backend(args.device, args.dtype, "none")
        prepared = PreparedBase("random-llama", root / "base", fingerprint_base_folder(root / "base"))
        base = load_base(prepared, backend, lora_slots=max(args.adapters, args.max_loras))
        loaded = []
        for i, path in enumerate(paths):
            folder = read_adapter_folder(path)
            validate_against_base(folder, base.signature)
            loaded.append(load_adapter(f"adapter-{i}", 1, folder, backend.device, backend.dtype))
        report["subject"]["parameters"] = sum(p.numel() for p in base.model.parameters())
        adapter_bytes = sum(t.numel() * t.element_size() for a in loaded for w in a.lora.values() for t in (w.a, w.b))
        report["roofline"] = roofline(base, args, bandwidth, adapter_bytes)
        print(f"# subject written and loaded in {time.perf_counter() - started:.1f} s "
              f"({report['subject']['parameters'] / 1e6:.1f} M parameters); roofline "
              f"{report['roofline']['tokens_per_s']:.0f} tok/s", flush=True)
        mixed = [loaded[i % len(loaded)] for i in range(count)]
        names = [f"adapter-{i % len(loaded)}" for i in range(count)]
        everyone = max(args.adapters, args.max_loras)

        def engine(part: slice, adapters: list, new_tokens: int) -> Callable[[], dict]:
            chosen = adapters[part]
            return lambda: run_engine(base, prompts[part], lambda i: chosen[i], lambda a: None, args,
                                      new_tokens=new_tokens, max_adapters=everyone, depth=len(prompts[part]))

        warm = slice(0, args.batch)
        engine(warm, [None] * count, WARM_TOKENS)()
        engine(warm, mixed, WARM_TOKENS)()  # also puts (b)'s adapters in the device slots (PEFT's are on it)
        peft = None
        if not args.skip_peft:
            try:
                peft = load_peft(root / "base", paths, args)
                run_peft(peft, prompts[:args.batch], names[:args.batch], args, WARM_TOKENS, batched=True)
            except Exception as exc:  # noqa: BLE001: (c) and (d) report it; the engine's figures stand
                systems.fail(("c_peft_mixed_batch", "d_peft_sequential"), exc)
                peft = None
        # Rounds interleave the systems, so a slow spell of the machine hits them alike.
        for r in range(args.rounds):
            part = slice(r * args.batch, (r + 1) * args.batch)
            seq = slice(r * args.batch, r * args.batch + args.sequential_per_round)
            label = f" (round {r + 1})"
            systems.run("a_engine_base", engine(part, [None] * count, args.new_tokens), label)
            systems.run("b_engine_mixed", engine(part, mixed, args.new_tokens), label)
            if peft is not None:
                systems.run("c_peft_mixed_batch", lambda: run_peft(peft, prompts[part], names[part], args,
                                                                    args.new_tokens, batched=True), label)
                systems.run("d_peft_sequential", lambda: run_peft(peft, prompts[seq], names[seq], args,
                                                                   args.new_tokens, batched=False), label)
        del peft
        free_memory()
        if not args.skip_sweep:
            try:
                folders = write_sweep_folders(root / "sweep", shapes, args)
                started = time.perf_counter()
                registry = build_sweep(base, folders, args)
                print(f"# {len(folders)} sweep adapters registered in {time.perf_counter() - started:.1f} s", flush=True)
                systems.run("e_engine_zipf_sweep",
                            lambda: run_sweep(base, registry, folders, prompts[:args.sweep_requests], args))
            except Exception as exc:  # noqa: BLE001
                systems.fail(("e_engine_zipf_sweep",), exc)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _on_sigterm)
    device_name = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else \
        f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    print(f"# {device_name}, {args.dtype}, batch {args.batch}, {args.prompt_tokens} prompt + {args.new_tokens} new "
          f"tokens, {args.adapters} adapters rank {args.rank} on {','.join(args.targets)}", flush=True)
    report = {
        "gpu": device_name, "device": args.device, "dtype": args.dtype, "versions": versions(),
        "subject": {"hidden": args.hidden, "layers": args.layers, "heads": args.heads, "kv_heads": args.kv_heads,
                    "intermediate": args.intermediate, "vocab": args.vocab, "tied_embeddings": True},
        "batch": args.batch, "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
        "rounds": args.rounds, "adapters": args.adapters, "rank": args.rank, "targets": list(args.targets),
        "sequential_requests": args.rounds * args.sequential_per_round,
        "sweep": {"adapters": args.sweep_adapters, "requests": args.sweep_requests, "ranks": list(args.sweep_ranks),
                  "zipf_exponent": ZIPF_EXPONENT, "max_loras": args.max_loras, "max_cpu_loras": args.max_cpu_loras},
        "copy_bandwidth_gb_s": None, "roofline": {},
    }
    systems = Systems()
    try:
        measure(args, systems, report)
    except Stopped:
        report["stopped"] = "SIGTERM before the end: the figures are those measured until then"
        for entry in systems.totals.values():
            if "tokens" not in entry and "error" not in entry:
                entry["error"] = "stopped (SIGTERM) before its first run finished"
        print("# stopped by SIGTERM", flush=True)
    report.update(systems=systems.totals,
                  tokens_per_s={k: v.get("tokens_per_s") for k, v in systems.totals.items()},
                  ratios=ratios(systems.totals, report["roofline"]), goals=GOALS)
    report["meets_goals"] = {k: (v >= GOALS[k] if v is not None else None) for k, v in report["ratios"].items()}
    out = args.out or (RESULTS / f"gpu_{datetime.date.today().isoformat()}.json" if args.device.startswith("cuda") else None)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"# written to {out}", flush=True)
    print(json.dumps(report), flush=True)
    return report


if __name__ == "__main__":
    main()
