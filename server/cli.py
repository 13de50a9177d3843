"""`server serve | ray-serve | add-adapter | remove-adapter | list-adapters` (console script `server`)."""

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
from server.flags import add_config_flags, config_values

DEFAULT_URL = f"http://127.0.0.1:{DEFAULT_PORT}"
CLIENT_TIMEOUT_S = 300.0
EXIT_USAGE = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="server", description="Serve many LoRA adapters on one frozen base.")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="start the HTTP server (every flag is also env LORAPLEX_<FLAG>)")
    add_config_flags(serve, ServerConfig)  # one source of names, defaults and help: ServerConfig

    from server.ray.cli import add_ray_serve_parser  # imports no Ray: only running the command does

    add_ray_serve_parser(sub)

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
    if args.command == "ray-serve":
        from server.ray.cli import ray_serve

        return ray_serve(args)
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
    from server.api.app import build_state, create_app
    from server.registry import AdapterExistsError, RegistryFullError
    from server.api.lifecycle import run_server

    try:
        config = ServerConfig(**config_values(args, ServerConfig))
    except ValidationError as exc:
        print(f"error: {_first_error(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    logging.basicConfig(level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not config.threads:
        config = config.model_copy(update={"threads": _default_threads()})
    _leave_cores_to_workers()
    try:  # everything heavy before serving: a bad base, --quant, --adapter or key file is one line, exit 2
        state = build_state(config)
        app = create_app(config, state=state)
    except (ValueError, AdapterExistsError, RegistryFullError) as exc:
        print(f"error: {str(exc).splitlines()[0]}", file=sys.stderr)
        return EXIT_USAGE
    return run_server(app, config.host, config.port, config.log_level)


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
