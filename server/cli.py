"""`server serve | add-adapter | remove-adapter | list-adapters` (console script `server`)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from urllib.parse import urlparse

import httpx
from pydantic import ValidationError

from server.auth import read_admin_token
from server.config import DEFAULT_PORT, ServerConfig, default_state_dir, env_admin_token

DEFAULT_URL = f"http://127.0.0.1:{DEFAULT_PORT}"
CLIENT_TIMEOUT_S = 300.0
EXIT_USAGE = 2


def _adapter_pair(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {text!r}")
    return name, path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="server", description="Serve many LoRA adapters on one frozen base.")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="start the HTTP server")
    serve.add_argument("--base", default=None, help="embedded name (smollm2-135m, minilm-l6), HF folder or .gguf "
                       "(default smollm2-135m; with --backend onnxruntime, the base of the exports)")
    serve.add_argument("--backend", choices=["torch", "onnxruntime"], default="torch",
                       help="torch: adapter folders on one base; onnxruntime: export folders from `training export`")
    serve.add_argument("--ort-threads", type=int, default=0, help="onnxruntime threads per session (0: one per core)")
    serve.add_argument("--threads", type=int, default=0,
                       help="torch threads of the model's worker thread (0: torch's default, one per core)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=DEFAULT_PORT)
    serve.add_argument("--adapter", action="append", type=_adapter_pair, default=[], metavar="NAME=PATH",
                       help="an adapter to load at start (repeatable)")
    serve.add_argument("--quant", choices=["none", "int8", "int4", "nf4", "fp4"], default="none",
                       help=ServerConfig.model_fields["quant"].description)
    serve.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    serve.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto")
    serve.add_argument("--max-model-len", type=int, default=2048)
    serve.add_argument("--served-name", default=None, help="model id of the base (default: the base name)")
    serve.add_argument("--max-num-seqs", type=int, default=16, help="requests decoding at once (KV cache slots)")
    serve.add_argument("--max-loras", type=int, default=32, help="distinct adapters in a batch (device LoRA slots)")
    serve.add_argument("--max-cpu-loras", type=int, default=64,
                       help="adapters kept loaded in memory (LRU); the others are re-read from their folder on use")
    serve.add_argument("--max-waiting", type=int, default=256, help="queued requests before 429")
    serve.add_argument("--lora-kernel", choices=["stacked", "loop"], default="stacked")
    serve.add_argument("--merge", action="store_true",
                       help="single-tenant mode: merge the hot adapter into the base weights, swap on demand")
    serve.add_argument("--log-level", default="info")

    for name, help_text in (("add-adapter", "load an adapter into a running server"),
                            ("remove-adapter", "unload an adapter from a running server"),
                            ("list-adapters", "list a running server's adapters")):
        cmd = sub.add_parser(name, help=help_text)
        if name != "list-adapters":
            cmd.add_argument("name")
        if name == "add-adapter":
            cmd.add_argument("path")
            cmd.add_argument("--pin", action="store_true", help="keep it resident")
            cmd.add_argument("--replace", action="store_true", help="replace an adapter of the same name")
        cmd.add_argument("--url", default=DEFAULT_URL)
        cmd.add_argument("--token", default=None, help="admin token (default: found on this host)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        return _serve(args)
    return _admin(args)


def _default_threads() -> int:
    import torch

    return torch.get_num_threads()


def _leave_cores_to_workers() -> None:
    """The main thread (start-up, the event loop) runs torch single-threaded; the model's worker threads
    get `threads` (server/engine/worker.py says why)."""
    import torch

    torch.set_num_threads(1)


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from server.api.app import create_app, load_engine_base

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    names = [name for name, _ in args.adapter]
    if len(set(names)) != len(names):
        print("error: an adapter name was given twice", file=sys.stderr)
        return EXIT_USAGE
    try:
        config = ServerConfig(
            base=args.base, host=args.host, port=args.port, adapters=dict(args.adapter), quant=args.quant,
            device=args.device, dtype=args.dtype, max_model_len=args.max_model_len, served_name=args.served_name,
            max_num_seqs=args.max_num_seqs, max_loras=args.max_loras, max_cpu_loras=args.max_cpu_loras, max_waiting=args.max_waiting,
            lora_kernel=args.lora_kernel, merge=args.merge, backend=args.backend, ort_threads=args.ort_threads,
            threads=args.threads or _default_threads(),
        )
    except ValidationError as exc:
        print(f"error: {_first_error(exc)}", file=sys.stderr)
        return EXIT_USAGE
    _leave_cores_to_workers()
    base = None
    if config.backend == "torch":  # load before serving, so a bad base or --quant is one line, not a traceback
        try:
            base = load_engine_base(config)
        except ValueError as exc:  # unknown base, --quant this machine can't run, a checkpoint that doesn't match
            print(f"error: {str(exc).splitlines()[0]}", file=sys.stderr)
            return EXIT_USAGE
    uvicorn.run(create_app(config, base), host=config.host, port=config.port, log_level=args.log_level)
    return 0


def _first_error(exc: ValidationError) -> str:
    """One line for the user: the first field's message, without pydantic's framing."""
    error = exc.errors()[0]
    where = ".".join(str(part) for part in error.get("loc", ()))
    message = str(error.get("msg", exc)).removeprefix("Value error, ")
    return f"{where}: {message}" if where else message


def _admin(args: argparse.Namespace) -> int:
    url = args.url.rstrip("/")
    port = urlparse(url).port or DEFAULT_PORT
    token = args.token or env_admin_token() or read_admin_token(default_state_dir(), port)
    if not token:
        print(f"error: no admin token found for port {port}; pass --token", file=sys.stderr)
        return EXIT_USAGE
    headers = {"Authorization": f"Bearer {token}"}
    try:
        with httpx.Client(base_url=url, headers=headers, timeout=CLIENT_TIMEOUT_S) as client:
            if args.command == "add-adapter":
                path = str(Path(args.path).expanduser().resolve())
                body = {"name": args.name, "path": path, "pin": args.pin, "replace": args.replace}
                response = client.post("/admin/adapters", json=body)
            elif args.command == "remove-adapter":
                response = client.delete(f"/admin/adapters/{args.name}")
            else:
                response = client.get("/admin/adapters")
    except httpx.HTTPError as exc:
        print(f"error: cannot reach the server at {url}: {exc}", file=sys.stderr)
        return 1
    if response.status_code >= 400:
        try:
            message = response.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = response.text
        print(f"error ({response.status_code}): {message}", file=sys.stderr)
        return 1
    print(json.dumps(response.json(), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
