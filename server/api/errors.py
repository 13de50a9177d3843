"""OpenAI-style error bodies: {"error": {"message", "type", "param", "code"}}, `param` naming the request field
at fault (or null). User errors are 4xx with a message; our own failures are logged with context and
answered 500 with nothing internal in the body.

The engine's own endings map to statuses here, once (`engine_error`): a full queue 429, the shutdown
503, the request timeout 504. 504 rather than 408: 408 says the *client* was too slow sending its
request (RFC 9110 15.5.9, and clients may silently resend on it); here the server took too long to answer.
Both 429 and 503 carry Retry-After."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from adapters import AdapterError
from server.engine.worker import EngineStopped, QueueFullError, RequestTimedOut
from server.registry import AdapterExistsError, AdapterNotReadyError, RegistryFullError, UnknownAdapterError

log = logging.getLogger(__name__)

RETRY_AFTER_S = "1"
RETRY_HEADERS = {"Retry-After": RETRY_AFTER_S}
DRAIN_HEADERS = {"Retry-After": RETRY_AFTER_S, "Connection": "close"}  # send the client to another replica


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", headers: dict | None = None,
                 param: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.kind = kind
        self.headers = headers
        self.param = param


ROUTE_OF_TASK = {"completion": "/v1/completions or /v1/chat/completions", "classification": "/v1/classify",
                 "embedding": "/v1/embeddings"}


def wrong_task(model: str, task: str) -> ApiError:
    """The 400 for an adapter sent to a route that does not serve its task; it names the route that does."""
    route = ROUTE_OF_TASK.get(task)
    return ApiError(400, f"adapter {model!r} is a {task} adapter" + (f"; use {route}" if route else ""), param="model")


def error_response(status: int, message: str, kind: str, headers: dict | None = None,
                   param: str | None = None) -> JSONResponse:
    return JSONResponse(
        status_code=status, content={"error": {"message": message, "type": kind, "param": param, "code": status}},
        headers=headers,
    )


def engine_error(cause: BaseException | None, failure: str = "the request failed") -> "ApiError":
    """The HTTP answer for an exception the engine ended a request with; `failure` for our own faults
    (logged where they happened, never shown)."""
    if isinstance(cause, QueueFullError):
        return ApiError(429, f"server is busy: {cause}", "rate_limit_error", RETRY_HEADERS)
    if isinstance(cause, EngineStopped):
        return ApiError(503, f"{cause}; retry", "unavailable_error", DRAIN_HEADERS)
    if isinstance(cause, RequestTimedOut):
        return ApiError(504, str(cause), "timeout_error")
    return ApiError(500, failure, "server_error")


UNKNOWN_FIELD = "unrecognized request argument (this server refuses the fields it does not implement)"


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        msg = UNKNOWN_FIELD if err.get("type") == "extra_forbidden" else err.get("msg")
        parts.append(f"{where}: {msg}" if where else str(msg))
    return "; ".join(parts) or "invalid request"


def _validation_param(exc: RequestValidationError) -> str | None:
    """The first offending field's dotted path (`messages.0.role`), as OpenAI's `param` names it."""
    for err in exc.errors():
        where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        if where:
            return where
    return None


def adapter_error(exc: Exception) -> ApiError | None:
    """The answer to an adapter registry's exception (None: not one of them); the Ray catalog gives the same."""
    if isinstance(exc, UnknownAdapterError):
        return ApiError(404, f"The model `{exc.args[0]}` does not exist.", "not_found_error")
    if isinstance(exc, (AdapterNotReadyError, AdapterExistsError)):
        return ApiError(409, str(exc), "conflict_error")
    if isinstance(exc, RegistryFullError):
        return ApiError(507, str(exc), "capacity_error")
    if isinstance(exc, AdapterError):
        return ApiError(400, str(exc), "invalid_adapter_error")
    return None


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.kind, exc.headers, exc.param)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(400, _validation_message(exc), "invalid_request_error", param=_validation_param(exc))

    @app.exception_handler(UnknownAdapterError)
    @app.exception_handler(AdapterNotReadyError)
    @app.exception_handler(AdapterExistsError)
    @app.exception_handler(RegistryFullError)
    @app.exception_handler(AdapterError)
    async def _adapter(_: Request, exc: Exception) -> JSONResponse:
        error = adapter_error(exc)
        return error_response(error.status, error.message, error.kind)

    @app.exception_handler(QueueFullError)
    @app.exception_handler(EngineStopped)
    @app.exception_handler(RequestTimedOut)
    async def _engine(_: Request, exc: Exception) -> JSONResponse:
        error = engine_error(exc)
        return error_response(error.status, error.message, error.kind, error.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail), "http_error", getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, "internal server error", "server_error")
