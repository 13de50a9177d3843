"""The app factory: the state is built before serving (the CLI) or in the lifespan (tests build their own app)."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from typing import AsyncIterator

from fastapi import FastAPI, Request

from adapters import resolve_base
from server.api import routes_admin, routes_classify, routes_embed, routes_generate, routes_ops
from server.api.body_limit import BodySizeLimit
from server.api.errors import install_error_handlers
from server.api.lifecycle import Lifecycle, RequestTracker
from server.api.structured import StructuredOutput
from server.api.state import AppState, Inference
from server.auth import establish_admin_token, load_api_keys
from server.config import ServerConfig
from server.engine.backend import choose_backend
from server.engine.base_head import base_classifier
from server.engine.base_model import BaseModel, load_base
from server.engine.classify_batcher import ClassifyBatcher
from server.engine.scheduler import Scheduler, SchedulerLimits
from server.metrics import EngineCollector, Metrics
from server.registry import AdapterRegistry
from server.registry_setup import build_registry

log = logging.getLogger(__name__)


def load_engine_base(config: ServerConfig) -> BaseModel:
    """The torch backend's base, loaded (and quantized) as the config says. Raises ValueError subclasses
    for what the user can fix: an unknown base, a --quant this machine can't run, a checkpoint that does
    not match the flag."""
    backend = choose_backend(config.device, config.dtype, config.quant)
    return load_base(resolve_base(config.base, config.cache_dir), backend, config.lora_kernel, config.max_loras)


def build_state(config: ServerConfig, base: BaseModel | None = None) -> AppState:
    """Load the base (unless given), register the start-up adapters, establish the admin token."""
    if config.backend == "onnxruntime":  # the backend is picked once, here
        from server.ort.state import build_ort_state  # onnxruntime is imported only when chosen

        return build_ort_state(config)
    if base is None:
        base = load_engine_base(config)
    metrics = Metrics()
    registry = build_registry(config, base, on_load=metrics.observe_adapter_load)  # start-up + restored adapters
    metrics.adapters_loaded.set(registry.ready_count())
    token = establish_admin_token(config.admin_token, config.state_dir, config.port)
    served = config.served_name or base.prepared.name
    lock = threading.Lock()  # one forward at a time: generation steps and classification share the model
    scheduler = None
    if base.can_generate:
        limits = SchedulerLimits(
            max_running=config.max_num_seqs, max_waiting=config.max_waiting,
            max_len=min(config.max_model_len, base.context_length),
            prefill_token_budget=config.max_num_batched_tokens, max_adapters_per_batch=config.max_loras,
        )
        scheduler = Scheduler(base, limits, lock, on_step=metrics.observe_step, merge=config.merge,
                              threads=config.threads or None, request_timeout=config.request_timeout)
    classifier = ClassifyBatcher(base, lock, config.max_classify_batch, config.classify_max_length,
                                 on_batch=lambda phase, n: metrics.batch_size.labels(phase).observe(n),
                                 threads=config.threads or None, max_waiting=config.max_classify_waiting,
                                 request_timeout=config.request_timeout)
    metrics.registry.register(EngineCollector(lambda: engine_readings(scheduler, base, registry)))
    return AppState(config=config, base=base, registry=registry, metrics=metrics, admin_token=token,
                    served_name=served, scheduler=scheduler, classifier=classifier,
                    base_classifier=base_classifier(base, served),
                    structured=StructuredOutput(base) if scheduler is not None else None)


def engine_readings(scheduler: Scheduler | None, base: BaseModel, registry: AdapterRegistry) -> dict[str, float]:
    values: dict[str, float] = {
        "loraplex_base_weight_bytes": base.weight_bytes,
        "loraplex_adapters_resident": registry.resident_count(),
        "loraplex_adapter_cache_hits": registry.stats.hits,
        "loraplex_adapter_cache_misses": registry.stats.misses,
        "loraplex_adapter_cache_evictions": registry.stats.evictions,
    }
    if scheduler is not None:
        stats = scheduler.stats
        values["loraplex_num_requests_running"] = stats.running
        values["loraplex_num_requests_waiting"] = stats.waiting
        values["loraplex_kv_cache_usage_perc"] = stats.kv_tokens / max(stats.kv_capacity, 1)
    slots = base.active.slots
    if slots is not None:
        values["loraplex_lora_slots_used"] = slots.resident()
        values["loraplex_lora_slot_hits"] = slots.hits
        values["loraplex_lora_slot_loads"] = slots.loads
        values["loraplex_lora_slot_evictions"] = slots.evictions
    return values


def create_app(config: ServerConfig, base: BaseModel | None = None, state: AppState | None = None) -> FastAPI:
    """The app, on `state` if given (the CLI builds it before serving), else built in the lifespan on `base`
    (loaded there if None). Raises ValueError for an API key file that cannot be read (read here, before serving).

    Around the routes, outermost first: RequestTracker (counts requests in flight for the drain),
    BodySizeLimit (413 before any parsing), then FastAPI. The inference routers get `Inference` (API key,
    then 503 while draining); the admin router has its own token; /health, /ready, /metrics are open.
    """
    lifecycle = Lifecycle(config.shutdown_timeout)
    built = state

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state = built if built is not None else build_state(config, base)
        workers = [w for w in (state.scheduler, state.classifier) if w is not None]
        for worker in workers:
            worker.start()
        lifecycle.workers = workers
        app.state.loraplex = state
        yield
        app.state.loraplex = None
        for worker in workers:  # each answers what it still holds (EngineStopped: 503)
            worker.stop()

    app = FastAPI(title="loraplex", version="0.1.0", lifespan=lifespan)
    app.state.lifecycle = lifecycle
    app.state.api_keys = load_api_keys(config.api_key, config.api_key_file)
    install_error_handlers(app)
    for module in (routes_generate, routes_classify, routes_embed):
        app.include_router(module.router, dependencies=[Inference])
    for module in (routes_admin, routes_ops):
        app.include_router(module.router)

    @app.middleware("http")
    async def count_requests(request: Request, call_next):
        started = time.perf_counter()
        response = await call_next(request)
        state: AppState | None = getattr(request.app.state, "loraplex", None)
        route = request.scope.get("route")
        if state is not None and route is not None and route.path != "/metrics":
            label = getattr(request.state, "adapter_label", "")
            state.metrics.requests.labels(route.path, str(response.status_code), label).inc()
            if not getattr(request.state, "latency_recorded_by_route", False):
                state.metrics.request_latency.labels(route.path, label).observe(time.perf_counter() - started)
        return response

    app.add_middleware(BodySizeLimit, max_bytes=config.max_request_bytes)
    app.add_middleware(RequestTracker, lifecycle=lifecycle)  # added last: outermost
    return app
