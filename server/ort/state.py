"""Build the app state for `--backend onnxruntime`: the same AppState, registry, metrics and routes as the
torch backend, with export folders read by ExportReader and served by the ORT workers."""

from __future__ import annotations

import threading

from server.api.state import AppState
from server.auth import establish_admin_token
from server.config import ServerConfig
from server.metrics import EngineCollector, Metrics
from server.ort.base import load_ort_base
from server.ort.classify import OrtClassifier
from server.ort.exports import ExportReader, SessionTracker
from server.ort.generate import OrtGenerator
from server.registry import AdapterRegistry


def build_ort_state(config: ServerConfig) -> AppState:
    first_export = next(iter(config.adapters.values()), None)
    base = load_ort_base(config.base, first_export, config.cache_dir)
    metrics = Metrics()
    sessions = SessionTracker(config.ort_threads)
    registry = AdapterRegistry(None, config.max_adapters, config.max_cpu_loras, on_load=metrics.observe_adapter_load,
                               reader=ExportReader(base, sessions))
    for name, path in config.adapters.items():
        registry.add(name, path)
    metrics.adapters_loaded.set(registry.ready_count())
    token = establish_admin_token(config.admin_token, config.state_dir, config.port)
    lock = threading.Lock()  # one session run at a time: each already uses every intra-op thread it is given
    generator = None
    if base.can_generate:
        generator = OrtGenerator(base, lock, config.max_waiting, min(config.max_model_len, base.context_length),
                                 on_step=metrics.observe_step)
    classifier = OrtClassifier(base, lock, config.max_classify_batch, config.classify_max_length,
                               on_batch=lambda n: metrics.batch_size.labels("classify").observe(n))
    metrics.registry.register(EngineCollector(lambda: ort_readings(generator, registry, sessions)))
    return AppState(config=config, base=base, registry=registry, metrics=metrics, admin_token=token,
                    served_name=config.served_name or base.name, scheduler=generator,
                    classifier=classifier)


def ort_readings(generator: OrtGenerator | None, registry: AdapterRegistry, sessions: SessionTracker) -> dict[str, float]:
    values: dict[str, float] = {
        "loraplex_adapters_resident": registry.resident_count(),
        "loraplex_adapter_cache_hits": registry.stats.hits,
        "loraplex_adapter_cache_misses": registry.stats.misses,
        "loraplex_adapter_cache_evictions": registry.stats.evictions,
        "loraplex_onnx_sessions_open": sessions.open_count(),
        "loraplex_onnx_session_loads": sessions.loads,
    }
    if generator is not None:
        values["loraplex_num_requests_running"] = generator.stats.running
        values["loraplex_num_requests_waiting"] = generator.stats.waiting
    return values
