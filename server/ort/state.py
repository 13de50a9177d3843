"""Build the app state for `--backend onnxruntime`: the same AppState, registry, metrics and routes as the
torch backend, with export folders read by ExportReader and served by the ORT workers.

The registry is built as the torch one is (server/registry_setup.py): runtime adds confined to the adapter
roots, under --max-adapter-bytes and --max-lora-rank (an export's `adapter_rank`; 0, unknown, passes),
the base's names reserved, and runtime-added exports persisted in the state dir. Their folder is keyed by
port and base fingerprint like the torch backend's, plus the backend: a torch and an onnxruntime server
of one base on one port (one after the other) serve different folders under the same names, and must not
replace each other's journal entries."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from server.api.state import AppState
from server.auth import establish_admin_token
from server.config import ServerConfig
from server.metrics import EngineCollector, Metrics
from server.ort.base import OrtBase, load_ort_base
from server.ort.classify import OrtClassifier
from server.ort.exports import ExportReader, SessionTracker
from server.ort.generate import OrtGenerator
from server.persist import runtime_state_dir
from server.registry import AdapterRegistry
from server.registry_setup import assemble_registry

log = logging.getLogger(__name__)

PERSIST_SUFFIX = "-onnxruntime"  # the runtime-adapter folder's name: port-P-base-FP-onnxruntime


def build_ort_state(config: ServerConfig) -> AppState:
    first_export = next(iter(config.adapters.values()), None)
    base = load_ort_base(config.base, first_export, config.cache_dir)
    metrics = Metrics()
    sessions = SessionTracker(config.ort_threads)
    served = config.served_name or base.name
    registry = assemble_registry(config, reserved_names={served, base.name},  # start-up + restored exports
                                 persist_folder=persist_folder(config, base), fingerprint=base.fingerprint,
                                 reader=ExportReader(base, sessions), on_load=metrics.observe_adapter_load)
    metrics.adapters_loaded.set(registry.ready_count())
    token = establish_admin_token(config.admin_token, config.state_dir, config.port)
    lock = threading.Lock()  # one session run at a time: each already uses every intra-op thread it is given
    generator = None
    if base.can_generate:
        generator = OrtGenerator(base, lock, config.max_waiting, min(config.max_model_len, base.context_length),
                                 on_step=metrics.observe_step, request_timeout=config.request_timeout)
    classifier = OrtClassifier(base, lock, config.max_classify_batch, config.classify_max_length,
                               on_batch=lambda n: metrics.batch_size.labels("classify").observe(n),
                               max_waiting=config.max_classify_waiting, request_timeout=config.request_timeout)
    metrics.registry.register(EngineCollector(lambda: ort_readings(generator, registry, sessions)))
    return AppState(config=config, base=base, registry=registry, metrics=metrics, admin_token=token,
                    served_name=served, scheduler=generator, classifier=classifier)


def persist_folder(config: ServerConfig, base: OrtBase) -> Path | None:
    """Where this server keeps its runtime-added exports; None (not persisted) for a base without a fingerprint."""
    if not base.fingerprint:
        log.warning("base %s has no fingerprint: exports added at run time will not survive a restart", base.name)
        return None
    folder = runtime_state_dir(config.state_dir, config.port, base.fingerprint)
    return folder.with_name(folder.name + PERSIST_SUFFIX)


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
