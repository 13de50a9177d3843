"""The torch backend's registry as `server serve` builds it: limits, reserved names, persistence, restore."""

from __future__ import annotations

import logging
from typing import Callable

from server.adapter_limits import AdapterLimits, default_adapter_roots
from server.config import ServerConfig
from server.engine.base_model import BaseModel
from server.persist import RuntimeAdapters, runtime_state_dir
from server.registry import AdapterRegistry

log = logging.getLogger(__name__)


def build_registry(config: ServerConfig, base: BaseModel,
                   on_load: Callable[[str, float], None] | None = None) -> AdapterRegistry:
    """Register the start-up adapters, then restore the runtime ones the state dir holds for this port and
    base. No --adapter-root: default_adapter_roots (the start-up adapters' parents and the state dir).
    On port 0 (a port chosen by the OS, different at every start) nothing is persisted: the state could
    not be found again, and two such servers would share one folder."""
    roots = tuple(config.adapter_roots) or default_adapter_roots(config.adapters.values(), config.state_dir)
    limits = AdapterLimits(roots=roots, max_bytes=config.max_adapter_bytes, max_rank=config.max_lora_rank)
    persist = None
    if config.port:
        persist = RuntimeAdapters(runtime_state_dir(config.state_dir, config.port, base.signature.fingerprint),
                                  base.signature.fingerprint)
    else:
        log.warning("port 0: adapters added at run time will not survive a restart")
    served = config.served_name or base.prepared.name
    registry = AdapterRegistry(base, config.max_adapters, config.max_cpu_loras, on_load=on_load, limits=limits,
                               reserved_names={served, base.prepared.name}, persist=persist)
    for name, path in config.adapters.items():
        registry.add(name, path, startup=True)
    registry.restore()
    return registry
