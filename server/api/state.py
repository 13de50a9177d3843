"""The app's state (the only state there is), built in the lifespan, reached through dependencies."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated

from fastapi import Depends, Header, Request
from starlette.concurrency import run_in_threadpool

from server.api.combination import COMBINATION_LABEL, CombinationRef, is_combination
from server.api.errors import DRAIN_HEADERS, ApiError
from server.api.lifecycle import Lifecycle
from server.api.structured import StructuredOutput
from server.auth import bearer_matches, secret_bytes
from server.config import ServerConfig
from server.engine.base_model import BaseModel
from server.engine.loaded import Combination, LoadedAdapter
from server.engine.classify_batcher import ClassifyBatcher
from server.engine.scheduler import Scheduler
from server.metrics import Metrics
from server.registry import AdapterRegistry, UnknownAdapterError

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
    structured: StructuredOutput | None = None  # response_format's compiler; None where it is not served
    started_at: int = field(default_factory=lambda: int(time.time()))

    @property
    def max_model_len(self) -> int:
        return min(self.config.max_model_len, self.base.context_length)

    async def acquire_model(self, model: str) -> LoadedAdapter | None:
        """None for the base's own name; else the adapter, held (never evicted) until `release_model`.
        404 / 409 are raised by the registry. A re-read from disk runs off the event loop. A combination
        ("a:0.7+b:0.3", see `acquire_combination`) is refused here: only completions serve one."""
        if model == self.served_name:
            return None
        if is_combination(model):
            raise ApiError(400, f"model {model!r} is an adapter combination; combinations are served by "
                                "/v1/completions and /v1/chat/completions only", param="model")
        if self.registry.is_resident(model):
            return self.registry.acquire(model)
        return await run_in_threadpool(self.registry.acquire, model)

    async def acquire_combination(self, model: str, ref: CombinationRef) -> Combination:
        """The combination's parents, each held (so neither evicted nor swapped under the request) until
        `release_model`; 400 naming `model` for a parent that is unknown, the base, or not a LoRA completion
        adapter. 409 (the registry's) for a parent still loading."""
        if self.served_name in ref.names:
            raise ApiError(400, f"model {model!r}: {self.served_name!r} is the base, not an adapter; a combination "
                                "names adapters only (the base is under every one of them)", param="model")
        names = list(ref.names)
        try:
            if all(self.registry.is_resident(n) for n in names):
                parents = self.registry.acquire_all(names)
            else:
                parents = await run_in_threadpool(self.registry.acquire_all, names)
        except UnknownAdapterError as exc:
            raise ApiError(400, f"model {model!r}: no adapter is called {exc.args[0]!r}", param="model") from exc
        for parent, (name, _) in zip(parents, ref.parts):
            why = _not_combinable(parent)
            if why:
                for held in parents:
                    self.registry.release(held)
                raise ApiError(400, f"model {model!r}: adapter {name!r} {why}; a combination sums LoRA "
                                    "completion adapters only", param="model")
        return Combination(tuple(zip(parents, (weight for _, weight in ref.parts))))

    def release_model(self, adapter: LoadedAdapter | Combination | None) -> None:
        if isinstance(adapter, Combination):
            for parent in adapter.members:
                self.registry.release(parent)
            return
        self.registry.release(adapter)

    def adapter_label(self, adapter: LoadedAdapter | Combination | None) -> str:
        """The metrics label of a request's model: the adapter's name (bounded by Metrics), the base's
        label for None, one fixed label for every combination (their strings are unbounded)."""
        if isinstance(adapter, Combination):
            return COMBINATION_LABEL
        return self.metrics.adapter_label(adapter.name if adapter is not None else None)


def _not_combinable(adapter: LoadedAdapter) -> str:
    """Why `adapter` cannot be a combination's parent ("" if it can)."""
    if adapter.task != "completion":
        return f"is a {adapter.task} adapter"
    if adapter.virtual_tokens is not None or adapter.prefix:
        return "is a prompt-learning adapter (virtual tokens or prefixes, not a LoRA delta)"
    if adapter.ia3:
        return "is an IA3 adapter (vectors that rescale, not a LoRA delta)"
    if adapter.dense:
        return "is a freeze adapter (trained weights, not a LoRA delta)"
    if not adapter.lora:
        return "has no LoRA weights"
    return ""


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
