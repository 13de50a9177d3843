"""A forwarded request run through an engine replica's own app (create_app's, the single server's), in process:
ASGI in, response pieces out (a ResponseStart, then body bytes), so a stream stays a stream across Ray.

The app sees an ordinary HTTP request: the body in one message, then `http.disconnect` only once the ingress
side has gone (the consumer of `run_asgi` stopped early: the client disconnected, or Ray cancelled the call).
That is what the single server's routes watch to free a request's KV slot, so a client that goes away from the
ingress frees it on the replica too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import AsyncIterator, Iterable

from starlette.types import ASGIApp, Message

from server.api.errors import error_response
from server.ray.wire import ForwardedRequest, ResponseStart

log = logging.getLogger(__name__)

APP_EXIT_WAIT_S = 5.0  # after the answer: time the app gets to finish its own clean-up (adapter release)
HOP_BY_HOP = frozenset({b"connection", b"keep-alive", b"transfer-encoding", b"te", b"upgrade", b"proxy-connection"})
_APP_DONE = object()


def scope_of(request: ForwardedRequest) -> dict:
    """The ASGI HTTP scope of a forwarded request; its body is whole, so its length is declared."""
    headers = [(k, v) for k, v in request.headers if k.lower() not in HOP_BY_HOP and k.lower() != b"content-length"]
    headers.append((b"content-length", str(len(request.body)).encode()))
    return {
        "type": "http", "asgi": {"version": "3.0", "spec_version": "2.4"}, "http_version": "1.1",
        "method": request.method, "scheme": "http", "path": request.path, "raw_path": request.path.encode(),
        "query_string": request.query_string, "root_path": "", "headers": headers,
        "client": request.client, "server": ("127.0.0.1", 0),
    }


async def run_asgi(app: ASGIApp, request: ForwardedRequest,
                   extra_headers: Iterable[tuple[bytes, bytes]] = ()) -> AsyncIterator[ResponseStart | bytes]:
    """Run `request` through `app`; yield its ResponseStart (with `extra_headers` added), then its body pieces,
    until the app says the body is complete."""
    body_sent = False
    gone = asyncio.Event()
    outbox: asyncio.Queue = asyncio.Queue()

    async def receive() -> Message:
        nonlocal body_sent
        if not body_sent:
            body_sent = True
            return {"type": "http.request", "body": request.body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        outbox.put_nowait(message)

    async def run() -> None:
        try:
            await app(scope_of(request), receive, send)
        finally:
            outbox.put_nowait(_APP_DONE)

    task = asyncio.create_task(run())
    try:
        while True:
            message = await outbox.get()
            if message is _APP_DONE:
                return  # the app ended without completing a body (it raised after its answer started)
            if message["type"] == "http.response.start":
                headers = tuple((bytes(k), bytes(v)) for k, v in message.get("headers", ()))
                yield ResponseStart(message["status"], headers + tuple(extra_headers))
            elif message["type"] == "http.response.body":
                if message.get("body"):
                    yield bytes(message["body"])
                if not message.get("more_body", False):
                    return
    finally:
        gone.set()
        await _settle(task)


async def _settle(task: asyncio.Task) -> None:
    """Let the app finish after its answer (or after the disconnect); cancel it past APP_EXIT_WAIT_S."""
    done, _ = await asyncio.wait({task}, timeout=APP_EXIT_WAIT_S)
    if not done:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return
    if not task.cancelled() and task.exception() is not None:
        log.error("the app failed on a forwarded request", exc_info=task.exception())


def error_pieces(status: int, message: str, kind: str,
                 extra_headers: Iterable[tuple[bytes, bytes]] = ()) -> list[ResponseStart | bytes]:
    """The single server's error answer (server/api/errors.py) as pieces, for what a replica refuses before
    its app sees the request."""
    response = error_response(status, message, kind)
    return [ResponseStart(status, tuple(response.raw_headers) + tuple(extra_headers)), bytes(response.body)]
