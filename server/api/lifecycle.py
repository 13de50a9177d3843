"""Readiness, admission and the graceful shutdown (drain) of one app, and the uvicorn server that drives it.

Why not uvicorn's own SIGTERM handling alone: on a signal uvicorn closes its listening sockets at once
(new clients get "connection refused", never a 503, and /ready cannot be seen going false), waits for
open connections without a bound unless `timeout_graceful_shutdown` is set, then *cancels* the request
tasks (the clients get a dropped connection with nothing) and only after that runs the lifespan shutdown
that stops the model workers. So the first SIGTERM or SIGINT starts a drain instead, while the server
still listens:

1. `draining` goes true: GET /ready answers 503 at once, new inference requests get 503 + Retry-After
   (and Connection: close, so clients reconnect elsewhere);
2. requests already accepted, running and queued alike, run on for up to `shutdown_timeout` seconds;
3. whatever is still unfinished then is failed by the workers (`ModelWorker.abort`): a non-streamed
   request gets a 503 body, a stream gets an error event; the app gets `ANSWER_GRACE_S` to write them;
4. then uvicorn's own shutdown runs: it finds no requests left, closes idle connections, runs the
   lifespan shutdown (the workers stop) and the process exits 0.

A second signal skips the wait (uvicorn's own handling: shutdown now; a second Ctrl-C force-quits).
The lifespan's `worker.stop()` answers anything still queued too, so an app run by another server
(TestClient, a plain `uvicorn.run`) still never leaves a request without an answer.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from types import FrameType
from typing import Sequence

import uvicorn
from starlette.applications import Starlette
from starlette.types import ASGIApp, Receive, Scope, Send

from server.engine.worker import EngineStopped, ModelWorker

log = logging.getLogger(__name__)

POLL_S = 0.05  # how often the drain looks at the in-flight count
ANSWER_GRACE_S = 5.0  # after the abort: time for the app to write the error answers
CONNECTION_GRACE_S = 5.0  # uvicorn's timeout_graceful_shutdown, a backstop once the drain is done
DRAIN_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Lifecycle:
    """One app's draining flag, its in-flight HTTP request count and the drain itself."""

    def __init__(self, shutdown_timeout: float) -> None:
        self.shutdown_timeout = shutdown_timeout
        self.draining = False
        self.in_flight = 0  # HTTP requests whose answer is not fully sent (RequestTracker)
        self.workers: Sequence[ModelWorker] = ()  # set by the lifespan

    async def drain(self) -> None:
        """Stop admitting, let accepted requests finish within `shutdown_timeout`, then fail the rest."""
        self.draining = True
        log.info("draining: %d requests in flight, waiting up to %g s", self.in_flight, self.shutdown_timeout)
        if await self._wait_idle(self.shutdown_timeout):
            log.info("drained: every accepted request was answered")
            return
        log.warning("shutdown timeout of %g s ran out with %d requests unfinished; answering them 503",
                    self.shutdown_timeout, self.in_flight)
        for worker in self.workers:
            worker.abort(EngineStopped("the server is shutting down (shutdown timeout reached)"))
        if not await self._wait_idle(ANSWER_GRACE_S):
            log.error("%d requests still unanswered %g s after the abort", self.in_flight, ANSWER_GRACE_S)

    async def _wait_idle(self, seconds: float) -> bool:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        while self.in_flight and loop.time() < deadline:
            await asyncio.sleep(POLL_S)
        return not self.in_flight


class RequestTracker:
    """Counts the HTTP requests in flight, from arrival until the app has sent the whole answer (a
    stream's last event included): what the drain waits for."""

    def __init__(self, app: ASGIApp, lifecycle: Lifecycle) -> None:
        self.app = app
        self.lifecycle = lifecycle

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        self.lifecycle.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.lifecycle.in_flight -= 1


class DrainingServer(uvicorn.Server):
    """uvicorn's server with the drain in front of its shutdown (the module docstring says why)."""

    def __init__(self, config: uvicorn.Config, lifecycle: Lifecycle) -> None:
        super().__init__(config)
        self.lifecycle = lifecycle
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_task: asyncio.Task | None = None
        self._drain_requested = False

    async def serve(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        """The first SIGTERM/SIGINT after start-up drains; anything else is uvicorn's. Not recording the
        signal in uvicorn's `_captured_signals` is what lets a drained shutdown exit 0 (uvicorn would
        re-raise it after serving, and the process would die of it)."""
        first = not self._drain_requested and not self.should_exit
        if sig in DRAIN_SIGNALS and first and self.started and self._loop is not None:
            self._drain_requested = True
            self._loop.call_soon_threadsafe(self._start_drain)  # a signal handler must not touch the loop
            return
        super().handle_exit(sig, frame)

    def _start_drain(self) -> None:
        self._drain_task = asyncio.ensure_future(self._drain_then_exit())

    async def _drain_then_exit(self) -> None:
        try:
            await self.lifecycle.drain()
        finally:
            self.should_exit = True  # uvicorn's main loop sees it within 0.1 s and shuts down


def run_server(app: Starlette, host: str, port: int, log_level: str) -> int:
    """Serve an app made by `create_app` until a signal, draining first; 0 once shut down."""
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                            timeout_graceful_shutdown=CONNECTION_GRACE_S)
    DrainingServer(config, app.state.lifecycle).run()
    return 0
