"""The ingress's HTTP app: the single server's API, served by a cluster of engine replicas.

- Everything with a `model` (completions, chat, classify, embeddings) is forwarded to an engine replica, with
  the catalog's entries for the adapters it names and its `model` as Ray's multiplexed model id (routing.py),
  and the replica's answer streamed back as it comes (SSE included).
- The admin routes (the same paths, bodies, token and answers as the single server's) go to the catalog,
  which applies the version rule for the whole cluster (catalog.py); /v1/models and GET /admin/adapters
  list the catalog, since no replica holds every adapter.
- GET /metrics/targets lists every replica's metrics endpoint (Prometheus HTTP service discovery);
  /metrics itself is per replica (replica_metrics.py says why) and answers 404 here, pointing there.
- Anything else (/health, /ready, /docs, /openapi.json) goes to any replica.

A replica that dies before answering gives 503 with Retry-After (the client may resend: it was not served);
one that dies mid-stream ends the stream with the single server's error event. `Cluster` is all it needs
from Ray, so tests run it on an in-process cluster.
"""

from __future__ import annotations

import json
import logging
from typing import AsyncIterator, Protocol

from fastapi import Depends, FastAPI, Request
from fastapi.responses import Response, StreamingResponse

from server.api.body_limit import BodySizeLimit
from server.api.errors import RETRY_HEADERS, ApiError, error_response, install_error_handlers
from server.api.schemas import (
    AdapterInfo, AddAdapterRequest, LoadLoraRequest, ModelCard, ModelList, UnloadLoraRequest,
)
from server.api.state import CHALLENGE, Authorization, require_api_key
from server.auth import bearer_matches, load_api_keys, secret_bytes
from server.config import ServerConfig
from server.ray.bridge import HOP_BY_HOP
from server.ray.routing import MODEL_ROUTES, adapter_names, model_of
from server.ray.wire import (
    AdminFailure, Backpressure, BaseCard, CatalogEntry, ForwardedRequest, ReplicaInfo, ReplicaLost, ResponseStart,
)

log = logging.getLogger(__name__)

FORWARDED_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]
KEYED_ROUTES = MODEL_ROUTES  # the inference routes, checked here before anything is routed or loaded


class Cluster(Protocol):
    """What the ingress asks of the catalog and the engine replicas."""

    async def resolve(self, names: tuple[str, ...]) -> dict[str, CatalogEntry | None]: ...

    def forward(self, request: ForwardedRequest, model_id: str) -> AsyncIterator[ResponseStart | bytes]:
        """The answer of the replica Ray picks; raises ReplicaLost or Backpressure."""

    async def entries(self) -> list[CatalogEntry]: ...

    async def add(self, name: str, path: str, replace: bool, pinned: bool) -> CatalogEntry | AdminFailure: ...

    async def remove(self, name: str) -> AdminFailure | None: ...

    async def base_card(self) -> BaseCard: ...

    async def replicas(self) -> list[ReplicaInfo]: ...


def create_router_app(config: ServerConfig, cluster: Cluster) -> FastAPI:
    """The ingress app; `config.admin_token` must be set (the CLI establishes it once for the cluster)."""
    if not config.admin_token:
        raise ValueError("the ingress needs the cluster's admin token")
    app = FastAPI(title="loraplex (Ray Serve ingress)", version="0.1.0", docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.api_keys = load_api_keys(config.api_key, config.api_key_file)
    install_error_handlers(app)
    admin_secret = [secret_bytes(config.admin_token)]
    base: list[BaseCard] = []  # the base's card, asked of a replica once

    def require_admin(authorization: Authorization = None) -> None:
        if not bearer_matches(authorization, admin_secret):
            raise ApiError(401, "admin token missing or wrong", "authentication_error", CHALLENGE)

    async def base_card() -> BaseCard:
        if not base:
            base.append(await cluster.base_card())
        return base[0]

    admin = [Depends(require_admin)]

    @app.post("/admin/adapters", dependencies=admin)
    async def add_adapter(body: AddAdapterRequest) -> AdapterInfo:
        return _info(_answer(await cluster.add(body.name, body.path, body.replace, body.pin)))

    @app.post("/v1/load_lora_adapter", dependencies=admin)
    async def load_lora_adapter(body: LoadLoraRequest) -> dict:
        info = _info(_answer(await cluster.add(body.lora_name, body.lora_path, False, False)))
        return {"status": "ok", "message": f"Success: LoRA adapter '{info.name}' added successfully.", "adapter": info}

    @app.post("/v1/unload_lora_adapter", dependencies=admin)
    async def unload_lora_adapter(body: UnloadLoraRequest) -> dict:
        _answer(await cluster.remove(body.lora_name))
        return {"status": "ok", "message": f"Success: LoRA adapter '{body.lora_name}' removed successfully."}

    @app.get("/admin/adapters", dependencies=admin)
    async def list_adapters() -> list[AdapterInfo]:
        return [_info(entry) for entry in await cluster.entries()]

    @app.delete("/admin/adapters/{name}", dependencies=admin)
    async def remove_adapter(name: str) -> dict:
        _answer(await cluster.remove(name))
        return {"status": "ok", "removed": name}

    @app.get("/v1/models", dependencies=[Depends(require_api_key)])
    async def list_models() -> ModelList:
        card = await base_card()
        cards = [ModelCard(id=card.served_name, created=card.created, root=card.root, task=card.task)]
        cards += [ModelCard(id=e.name, created=card.created, root=e.path, parent=card.served_name, task=e.task)
                  for e in await cluster.entries()]
        return ModelList(data=cards)

    @app.get("/metrics/targets")
    async def metrics_targets() -> list[dict]:
        """Prometheus HTTP service discovery (`http_sd_configs`): one target per replica with metrics."""
        return [{"targets": [f"{r.metrics_host}:{r.metrics_port}"], "labels": {"replica": r.replica,
                                                                                 "rank": str(r.rank)}}
                for r in sorted(await cluster.replicas(), key=lambda r: (r.node_ip, r.rank)) if r.metrics_port]

    @app.get("/metrics")
    async def metrics() -> Response:
        return error_response(404, "metrics are per replica on Ray Serve: scrape the targets GET /metrics/targets "
                                   "lists (Prometheus http_sd_configs); docs/scaleout.md#metrics", "not_found_error")

    @app.api_route("/{path:path}", methods=FORWARDED_METHODS, include_in_schema=False)
    async def forward(request: Request, path: str) -> Response:
        return await _forward(request, cluster, base_card)

    app.add_middleware(BodySizeLimit, max_bytes=config.max_request_bytes)
    return app


async def _forward(request: Request, cluster: Cluster, base_card) -> Response:
    path = request.url.path
    if path in KEYED_ROUTES:
        require_api_key(request, request.headers.get("authorization"))
    body = await request.body()
    model = model_of(request.method, path, body)
    names = adapter_names(model, (await base_card()).served_name) if model is not None else ()
    entries = await cluster.resolve(names) if names else {}
    model_id = model if names and all(entries.values()) else ""  # unknown adapters: any replica answers 404
    client = (request.client.host, request.client.port) if request.client else None
    forwarded = ForwardedRequest(request.method, path, request.scope.get("query_string", b""),
                                 tuple(request.scope["headers"]), body, client, tuple(entries.items()))
    pieces = cluster.forward(forwarded, model_id or "")
    try:
        start = await anext(pieces)
    except ReplicaLost as exc:
        return error_response(503, f"{exc}; retry", "unavailable_error", RETRY_HEADERS)
    except Backpressure as exc:
        return error_response(429, f"server is busy: {exc}", "rate_limit_error", RETRY_HEADERS)
    except StopAsyncIteration:
        log.error("a replica ended %s %s without an answer", request.method, path)
        return error_response(500, "internal server error", "server_error")
    headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in start.headers if k.lower() not in HOP_BY_HOP}
    streamed = headers.get("content-type", "").startswith("text/event-stream")
    return StreamingResponse(_rest(pieces, streamed), status_code=start.status, headers=headers)


async def _rest(pieces: AsyncIterator[ResponseStart | bytes], streamed: bool) -> AsyncIterator[bytes]:
    """The body after the start; a replica lost mid-stream ends an event stream with an error event."""
    try:
        async for piece in pieces:
            if isinstance(piece, bytes):
                yield piece
    except ReplicaLost as exc:
        log.warning("a replica was lost mid-answer: %s", exc)
        if streamed:
            error = {"error": {"message": f"{exc}; the answer is incomplete", "type": "unavailable_error",
                               "code": 503}}
            yield f"data: {json.dumps(error)}\n\n".encode()
    finally:
        await pieces.aclose()


def _answer(result):
    """An admin call's value, or its AdminFailure raised as the single server's error answer."""
    if isinstance(result, AdminFailure):
        raise ApiError(result.status, result.message, result.kind)
    return result


def _info(entry: CatalogEntry) -> AdapterInfo:
    """`resident` is per replica on a cluster: their metrics say which holds what (loraplex_replica_adapters_held)."""
    return AdapterInfo(name=entry.name, state="ready", source=entry.path, pinned=entry.pinned, task=entry.task,
                       rank=entry.rank, version=entry.version, resident=False)

