"""Over HTTP, as clients see it: concurrent streaming clients, each on its own adapter, vs base only.

Starts `server serve` on loopback with N random rank-16 adapters (q,k,v,o), runs the same streamed
requests in ONE run (all on the base; all on the base with `logprobs` on every request; then each client
on its own adapter; then the same prompts as chat messages, plain and with a JSON schema as
`response_format` on every request), counts the tokens that arrive as server-sent events, and prints
tokens/s and the ratios as the last line in JSON: logprobs/base (target >= 0.9) and json_schema/chat, the
constrained chat run against the plain chat run (target >= 0.8). The constrained replies end when their
JSON is complete, so they are shorter and spend a larger share of their time in prefill: the ratio is
tokens/s of each run, which counts that against the grammar.

    python benchmarks/bench_http_streaming.py                     # fp32
    python benchmarks/bench_http_streaming.py --dtype bfloat16
    python benchmarks/bench_http_streaming.py --logprobs 0 --no-json-schema   # skip those runs
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_multi_adapter import make_peft_adapters, make_prompts  # noqa: E402

STARTUP_TIMEOUT_S = 300


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", default="smollm2-135m")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--logprobs", type=int, default=5, help="top logprobs asked on every request of the logprobs run "
                                                           "(0: no such run)")
    p.add_argument("--no-json-schema", dest="json_schema", action="store_false",
                   help="skip the chat runs (plain and with a JSON schema on every request)")
    p.add_argument("--cache-dir", default=os.environ.get("LORAPLEX_CACHE", str(Path.home() / ".cache" / "loraplex")))
    return p.parse_args()


# What the constrained chat run asks every reply to be: long enough free text fields that a reply runs
# for many tokens, in an object with required keys and an array.
REPORT_SCHEMA = {
    "type": "object",
    "properties": {"title": {"type": "string"}, "summary": {"type": "string"},
                   "tags": {"type": "array", "items": {"type": "string"}}, "score": {"type": "integer"}},
    "required": ["title", "summary", "tags", "score"],
}
RESPONSE_FORMAT = {"type": "json_schema", "json_schema": {"name": "report", "schema": REPORT_SCHEMA, "strict": True}}


async def stream_one(client: httpx.AsyncClient, model: str, prompt: str, new_tokens: int,
                     logprobs: int | None = None, chat: str | None = None) -> int:
    """`chat`: None for /v1/completions; "plain" or "json_schema" for /v1/chat/completions."""
    body = {"model": model, "max_tokens": new_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    if chat is None:
        body["prompt"] = prompt
    else:
        body["messages"] = [{"role": "user", "content": f"Write a short report as JSON about: {prompt}"}]
    if chat == "json_schema":  # a constrained reply ends with EOS once complete: ignore_eos does not apply
        del body["ignore_eos"]
        body["response_format"] = RESPONSE_FORMAT
    if logprobs is not None:
        body["logprobs"] = logprobs
    tokens = 0
    route = "/v1/completions" if chat is None else "/v1/chat/completions"
    async with client.stream("POST", route, json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunk = json.loads(line[len("data: "):])
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                elif logprobs is not None and chunk["choices"] and chunk["choices"][0]["logprobs"] is None:
                    raise SystemExit("asked for logprobs, got a chunk without them")
    return tokens


async def run_clients(url: str, models: list[str], prompts: list[str], clients: int, new_tokens: int,
                      logprobs: int | None = None, chat: str | None = None) -> dict:
    queue: asyncio.Queue = asyncio.Queue()
    for i, prompt in enumerate(prompts):
        queue.put_nowait((i, prompt))
    total = 0

    async def client_loop(index: int) -> None:
        nonlocal total
        async with httpx.AsyncClient(base_url=url, timeout=600) as client:
            while not queue.empty():
                _, prompt = queue.get_nowait()
                tokens = await stream_one(client, models[index % len(models)], prompt, new_tokens, logprobs, chat)
                total += tokens  # not `total += await ...`: that reads `total` before the await and loses updates

    started = time.perf_counter()
    await asyncio.gather(*(client_loop(i) for i in range(clients)))
    elapsed = time.perf_counter() - started
    return {"tokens_per_s": total / elapsed, "tokens": total, "seconds": elapsed,
            "tokens_per_request": total / len(prompts)}


def main() -> None:
    args = parse_args()
    from transformers import AutoTokenizer

    from adapters import resolve_base

    prepared = resolve_base(args.base, Path(args.cache_dir))
    tokenizer = AutoTokenizer.from_pretrained(prepared.path)
    prompts = [tokenizer.decode(ids) for ids in make_prompts(tokenizer, args.requests, args.prompt_tokens)]
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_peft_adapters(prepared.path, args.clients, args.rank, Path(tmp))
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        cmd = [str(Path(sys.executable).parent / "server"), "serve", "--base", args.base, "--port", str(port),
               "--dtype", args.dtype, "--log-level", "warning"]
        for i, path in enumerate(paths):
            cmd += ["--adapter", f"adapter-{i}={path}"]
        env = {**os.environ, "LORAPLEX_STATE": str(Path(tmp) / "state")}
        proc = subprocess.Popen(cmd, env=env)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + STARTUP_TIMEOUT_S
            while True:
                try:
                    if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise SystemExit("server did not start")
                time.sleep(0.5)
            asyncio.run(run_clients(url, [args.base], prompts[: args.clients], args.clients, 4))  # warm-up
            base = asyncio.run(run_clients(url, [args.base], prompts, args.clients, args.new_tokens))
            print("base only:", base, flush=True)
            with_logprobs = None
            if args.logprobs:
                with_logprobs = asyncio.run(run_clients(url, [args.base], prompts, args.clients, args.new_tokens,
                                                        args.logprobs))
                print(f"base only, logprobs={args.logprobs} on every request:", with_logprobs, flush=True)
            adapters = [f"adapter-{i}" for i in range(args.clients)]
            mixed = asyncio.run(run_clients(url, adapters, prompts, args.clients, args.new_tokens))
            print(f"{args.clients} clients on {args.clients} distinct adapters:", mixed, flush=True)
            chat = constrained = None
            if args.json_schema:
                asyncio.run(run_clients(url, [args.base], prompts[:1], 1, 4, chat="json_schema"))  # compile once
                chat = asyncio.run(run_clients(url, [args.base], prompts, args.clients, args.new_tokens, chat="plain"))
                print("base only, chat:", chat, flush=True)
                constrained = asyncio.run(run_clients(url, [args.base], prompts, args.clients, args.new_tokens,
                                                      chat="json_schema"))
                print("base only, chat with a JSON schema on every request:", constrained, flush=True)
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    summary = {"dtype": args.dtype, "base_tokens_per_s": round(base["tokens_per_s"], 2),
               "mixed_tokens_per_s": round(mixed["tokens_per_s"], 2),
               "mixed/base": round(mixed["tokens_per_s"] / base["tokens_per_s"], 3)}
    if with_logprobs is not None:
        summary.update({"logprobs": args.logprobs, "logprobs_tokens_per_s": round(with_logprobs["tokens_per_s"], 2),
                        "logprobs/base": round(with_logprobs["tokens_per_s"] / base["tokens_per_s"], 3)})
    if chat is not None:
        summary.update({"chat_tokens_per_s": round(chat["tokens_per_s"], 2),
                        "json_schema_tokens_per_s": round(constrained["tokens_per_s"], 2),
                        "json_schema_tokens_per_request": round(constrained["tokens_per_request"], 1),
                        "json_schema/chat": round(constrained["tokens_per_s"] / chat["tokens_per_s"], 3)})
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
