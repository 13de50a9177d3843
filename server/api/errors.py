"""OpenAI-style error bodies: {"error": {"message", "type", "code"}}. User errors are 4xx with a message;
our own failures are logged with context and answered 500 with nothing internal in the body."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from adapters import AdapterError
from server.registry import AdapterExistsError, AdapterNotReadyError, RegistryFullError, UnknownAdapterError

log = logging.getLogger(__name__)


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.kind = kind
        self.headers = headers


def error_response(status: int, message: str, kind: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(
        status_code=status, content={"error": {"message": message, "type": kind, "code": status}}, headers=headers
    )


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        parts.append(f"{where}: {err.get('msg')}" if where else str(err.get("msg")))
    return "; ".join(parts) or "invalid request"


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.kind, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(400, _validation_message(exc), "invalid_request_error")

    @app.exception_handler(UnknownAdapterError)
    async def _unknown(_: Request, exc: UnknownAdapterError) -> JSONResponse:
        return error_response(404, f"The model `{exc.args[0]}` does not exist.", "not_found_error")

    @app.exception_handler(AdapterNotReadyError)
    async def _not_ready(_: Request, exc: AdapterNotReadyError) -> JSONResponse:
        return error_response(409, str(exc), "conflict_error")

    @app.exception_handler(AdapterExistsError)
    async def _exists(_: Request, exc: AdapterExistsError) -> JSONResponse:
        return error_response(409, str(exc), "conflict_error")

    @app.exception_handler(RegistryFullError)
    async def _full(_: Request, exc: RegistryFullError) -> JSONResponse:
        return error_response(507, str(exc), "capacity_error")

    @app.exception_handler(AdapterError)
    async def _adapter(_: Request, exc: AdapterError) -> JSONResponse:
        return error_response(400, str(exc), "invalid_adapter_error")

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail), "http_error", getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, "internal server error", "server_error")
