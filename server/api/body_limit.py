"""A cap on request body size, enforced before anything parses the body (HTTP 413).

A pure ASGI middleware: a declared Content-Length over the cap is refused without reading a byte; a body
without one (chunked) is counted as it streams in and refused the moment it passes the cap. The body is
then handed to the app as it came, so routes, FastAPI's parsing and disconnect detection are unchanged.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.api.errors import error_response


class BodySizeLimit:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared == -1:
            await _refuse(scope, receive, send, 400, "Content-Length is not a non-negative integer")
            return
        if declared is not None and declared > self.max_bytes:
            await self._too_large(scope, receive, send, f"declares {declared} bytes")
            return
        buffered: list[Message] = []
        size = 0
        while True:
            message = await receive()
            buffered.append(message)
            if message["type"] != "http.request":  # http.disconnect: let the app see it
                break
            size += len(message.get("body", b""))
            if size > self.max_bytes:
                await self._too_large(scope, receive, send, f"passed {self.max_bytes} bytes while streaming")
                return
            if not message.get("more_body", False):
                break

        async def replay() -> Message:
            return buffered.pop(0) if buffered else await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send, what: str) -> None:
        await _refuse(scope, receive, send, 413,
                      f"request body {what}; this server takes at most {self.max_bytes} bytes (max_request_bytes)")


async def _refuse(scope: Scope, receive: Receive, send: Send, status: int, message: str) -> None:
    # The unread rest of the body makes the server close the connection after this answer.
    await error_response(status, message, "invalid_request_error", {"Connection": "close"})(scope, receive, send)


def _content_length(scope: Scope) -> int | None:
    """The declared length; None when absent; -1 when it is not a number (a bad request)."""
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            text = value.decode("latin-1").strip()
            return int(text) if text.isdigit() else -1
    return None
