"""`server serve` as a child process on a free loopback port, ready before it is handed out.

The load run starts its own servers (a decoder with the completion adapters, an encoder with the
classifiers), each with its own state dir and a known admin token (LORAPLEX_ADMIN_TOKEN), so a run
never touches the user's ~/.local/state and the admin user needs no token file.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import httpx

LOOPBACK = "127.0.0.1"
STARTUP_TIMEOUT_S = 300
READY_POLL_S = 0.5
STOP_TIMEOUT_S = 30
SERVER_BIN = Path(sys.executable).parent / "server"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


@dataclass(frozen=True)
class Server:
    url: str
    port: int
    log: Path
    process: subprocess.Popen


def start_server(base: str, adapters: dict[str, Path], state_dir: Path, adapter_roots: list[Path],
                 admin_token: str, log: Path, extra_args: tuple[str, ...] = ()) -> Server:
    """Start `server serve` (not waiting for it: see `wait_ready`, so that two servers load at once)."""
    port = free_port()
    cmd = [str(SERVER_BIN), "serve", "--base", base, "--host", LOOPBACK, "--port", str(port),
           "--state-dir", str(state_dir), "--log-level", "warning", *extra_args]
    for root in adapter_roots:
        cmd += ["--adapter-root", str(root)]
    for name, path in adapters.items():
        cmd += ["--adapter", f"{name}={path}"]
    env = {**os.environ, "LORAPLEX_ADMIN_TOKEN": admin_token}
    handle = open(log, "w")
    process = subprocess.Popen(cmd, env=env, stdout=handle, stderr=subprocess.STDOUT)
    handle.close()  # the child holds its own copy
    return Server(f"http://{LOOPBACK}:{port}", port, log, process)


def wait_ready(server: Server, timeout_s: float = STARTUP_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        if server.process.poll() is not None:
            raise RuntimeError(f"server on port {server.port} exited ({server.process.returncode}):\n"
                               f"{server.log.read_text()[-4000:]}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"server on port {server.port} not ready after {timeout_s:.0f} s; see {server.log}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{server.url}/ready", timeout=2).status_code == 200:
                return
        time.sleep(READY_POLL_S)


def stop_server(server: Server) -> None:
    """SIGTERM (the server drains), then SIGKILL if it is still there after STOP_TIMEOUT_S."""
    if server.process.poll() is not None:
        return
    server.process.send_signal(signal.SIGTERM)
    try:
        server.process.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait()


@contextlib.contextmanager
def running(servers: list[Server]) -> Iterator[list[Server]]:
    """Wait until every server is ready; stop them all on the way out, whatever happened."""
    try:
        for server in servers:
            wait_ready(server)
        yield servers
    finally:
        for server in servers:
            stop_server(server)
