"""The app's state (the only state there is), built in the lifespan, reached through dependencies."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated

from fastapi import Depends, Header, Request
from starlette.concurrency import run_in_threadpool

from server.api.errors import DRAIN_HEADERS, ApiError
from server.api.lifecycle import Lifecycle
from server.auth import bearer_matches, secret_bytes
from server.config import ServerConfig
from server.engine.base_model import BaseModel
from server.engine.loaded import LoadedAdapter
from server.engine.classify_batcher import ClassifyBatcher
from server.engine.scheduler import Scheduler
from server.metrics import Metrics
from server.registry import AdapterRegistry

if TYPE_CHECKING:  # the onnxruntime backend's counterparts (server/ort imports onnxruntime only when chosen)
    from server.ort.base import OrtBase
    from server.ort.classify import OrtClassifier
    from server.ort.generate import OrtGenerator


@dataclass
class AppState:
    config: ServerConfig
    base: BaseModel | OrtBase
    registry: AdapterRegistry
    metrics: Metrics
    admin_token: str
    served_name: str
    scheduler: Scheduler | OrtGenerator | None  # continuous batching for generation; None on encoder bases
    classifier: ClassifyBatcher | OrtClassifier  # batched classification (any base)
    base_classifier: LoadedAdapter | None = None  # the base's own head, when the base is a trained classifier
    started_at: int = field(default_factory=lambda: int(time.time()))

    @property
    def max_model_len(self) -> int:
        return min(self.config.max_model_len, self.base.context_length)

    async def acquire_model(self, model: str) -> LoadedAdapter | None:
        """None for the base's own name; else the adapter, held (never evicted) until `release_model`.
        404 / 409 are raised by the registry. A re-read from disk runs off the event loop."""
        if model == self.served_name:
            return None
        if self.registry.is_resident(model):
            return self.registry.acquire(model)
        return await run_in_threadpool(self.registry.acquire, model)

    def release_model(self, adapter: LoadedAdapter | None) -> None:
        self.registry.release(adapter)


def get_state(request: Request) -> AppState:
    state = getattr(request.app.state, "loraplex", None)
    if state is None:
        raise ApiError(503, "server is starting", "unavailable_error")
    return state


State = Annotated[AppState, Depends(get_state)]


Authorization = Annotated[str | None, Header()]
CHALLENGE = {"WWW-Authenticate": "Bearer"}


def require_admin(state: State, authorization: Authorization = None) -> None:
    """Admin routes need `Authorization: Bearer <admin token>` (an API key does not do); constant time."""
    if not bearer_matches(authorization, [secret_bytes(state.admin_token)]):
        raise ApiError(401, "admin token missing or wrong", "authentication_error", CHALLENGE)


def require_api_key(request: Request, authorization: Authorization = None) -> None:
    """With API keys configured, `Authorization: Bearer <key>` (the OpenAI clients' header); else open.
    The admin token is not an API key (server/auth.py says why)."""
    keys: tuple[bytes, ...] = request.app.state.api_keys
    if keys and not bearer_matches(authorization, keys):
        raise ApiError(401, "API key missing or wrong: send `Authorization: Bearer <key>`", "authentication_error",
                       CHALLENGE)


def admit_inference(request: Request, _: Annotated[None, Depends(require_api_key)]) -> None:
    """Inference routes: the API key, then admission, which stops (503) once the server drains."""
    lifecycle: Lifecycle = request.app.state.lifecycle
    if lifecycle.draining:
        raise ApiError(503, "the server is shutting down; retry", "unavailable_error", DRAIN_HEADERS)


Admin = Depends(require_admin)
ApiKey = Depends(require_api_key)
Inference = Depends(admit_inference)
