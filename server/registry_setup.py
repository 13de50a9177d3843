"""The registry as `server serve` builds it, for either backend: limits, reserved names, persistence, restore."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Iterable

from server.adapter_limits import AdapterLimits, default_adapter_roots
from server.config import ServerConfig
from server.engine.base_model import BaseModel
from server.persist import RuntimeAdapters, runtime_state_dir
from server.registry import AdapterReader, AdapterRegistry

log = logging.getLogger(__name__)


def build_registry(config: ServerConfig, base: BaseModel,
                   on_load: Callable[[str, float], None] | None = None) -> AdapterRegistry:
    """The torch backend's registry: adapter folders read onto `base` (see `assemble_registry`)."""
    served = config.served_name or base.prepared.name
    fingerprint = base.signature.fingerprint
    return assemble_registry(config, base=base, reserved_names={served, base.prepared.name},
                             persist_folder=runtime_state_dir(config.state_dir, config.port, fingerprint),
                             fingerprint=fingerprint, on_load=on_load)


def assemble_registry(config: ServerConfig, *, reserved_names: Iterable[str], persist_folder: Path | None,
                      fingerprint: str, base: BaseModel | None = None, reader: AdapterReader | None = None,
                      on_load: Callable[[str, float], None] | None = None) -> AdapterRegistry:
    """Register the start-up adapters, then restore the runtime ones `persist_folder` holds (keyed by port
    and base fingerprint, server/persist.py; the onnxruntime backend's also by backend). No --adapter-root:
    default_adapter_roots (the start-up adapters' parents and the state dir). `persist_folder` None, or
    port 0 (a port chosen by the OS, different at every start), persists nothing: the state could not be
    found again, and two such servers would share one folder. `reader` None: the torch reader on `base`."""
    roots = tuple(config.adapter_roots) or default_adapter_roots(config.adapters.values(), config.state_dir)
    limits = AdapterLimits(roots=roots, max_bytes=config.max_adapter_bytes, max_rank=config.max_lora_rank)
    persist = None
    if config.port and persist_folder is not None:
        persist = RuntimeAdapters(persist_folder, fingerprint)
    elif not config.port:
        log.warning("port 0: adapters added at run time will not survive a restart")
    registry = AdapterRegistry(base, config.max_adapters, config.max_cpu_loras, on_load=on_load, reader=reader,
                               limits=limits, reserved_names=reserved_names, persist=persist)
    for name, path in config.adapters.items():
        registry.add(name, path, startup=True)
    registry.restore()
    return registry
