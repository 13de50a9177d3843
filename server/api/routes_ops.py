"""GET /v1/models, /health, /ready, /metrics."""

from __future__ import annotations

import json

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from server.api.schemas import ModelCard, ModelList
from server.api.state import ApiKey, State
from server.registry import AdapterState

router = APIRouter(tags=["ops"])


@router.get("/v1/models", response_model=ModelList, dependencies=[ApiKey])
async def list_models(state: State) -> ModelList:
    base_task = "completion" if state.base.can_generate else "classification"
    cards = [ModelCard(id=state.served_name, created=state.started_at, root=str(state.base.prepared.path), task=base_task)]
    for entry in state.registry.entries():
        if entry.state is AdapterState.READY:
            cards.append(ModelCard(
                id=entry.name, created=state.started_at, root=str(entry.source), parent=state.served_name,
                task=entry.task,
            ))
    return ModelList(data=cards)


@router.get("/health")
async def health(request: Request) -> Response:
    """200 while the model's worker threads run; 503 naming the one that died (a supervisor restarts us)."""
    state = getattr(request.app.state, "loraplex", None)
    for worker in (getattr(state, "scheduler", None), getattr(state, "classifier", None)):
        failure = getattr(worker, "failure", None)
        if failure is not None or (worker is not None and not getattr(worker, "alive", True)):
            body = json.dumps({"status": "unhealthy", "reason": f"worker thread died: {failure or 'unknown'}"})
            return Response(body, status_code=503, media_type="application/json")
    return Response('{"status": "ok"}', media_type="application/json")


@router.get("/ready")
async def ready(request: Request) -> Response:
    """503 while starting and from the moment a drain begins (server/api/lifecycle.py), else 200."""
    if request.app.state.lifecycle.draining:
        return Response('{"status": "draining"}', status_code=503, media_type="application/json")
    if getattr(request.app.state, "loraplex", None) is None:
        return Response('{"status": "starting"}', status_code=503, media_type="application/json")
    return Response('{"status": "ready"}', media_type="application/json")


@router.get("/metrics")
async def metrics(state: State) -> Response:
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
