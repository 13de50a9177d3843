"""Adapters by name, with an explicit state per entry: loading -> ready (a failed load leaves no entry,
or the previous version in place, and the caller gets the error).

Loading reads and validates the folder outside the lock; the swap into the table is atomic, so a
request resolves either the old version or the new one, never a half-loaded adapter.
"""

from __future__ import annotations

import enum
import itertools
import logging
import threading
from dataclasses import dataclass
from pathlib import Path

from adapters import AdapterError, read_adapter_folder, validate_adapter_name, validate_against_base
from server.engine.base_model import BaseModel
from server.engine.loaded import LoadedAdapter, load_adapter

log = logging.getLogger(__name__)


class AdapterState(str, enum.Enum):
    LOADING = "loading"
    READY = "ready"


@dataclass(frozen=True)
class RegistryEntry:
    name: str
    state: AdapterState
    source: Path
    adapter: LoadedAdapter | None = None
    pinned: bool = False


class UnknownAdapterError(KeyError):
    pass


class AdapterNotReadyError(RuntimeError):
    pass


class AdapterExistsError(RuntimeError):
    pass


class RegistryFullError(RuntimeError):
    pass


class AdapterRegistry:
    def __init__(self, base: BaseModel, max_adapters: int) -> None:
        self.base = base
        self.max_adapters = max_adapters
        self._entries: dict[str, RegistryEntry] = {}
        self._lock = threading.Lock()
        self._versions = itertools.count(1)

    def entries(self) -> list[RegistryEntry]:
        with self._lock:
            return list(self._entries.values())

    def names(self) -> list[str]:
        return [e.name for e in self.entries()]

    def ready_count(self) -> int:
        return sum(e.state is AdapterState.READY for e in self.entries())

    def resolve(self, name: str) -> LoadedAdapter:
        """The ready adapter called `name`; UnknownAdapterError or AdapterNotReadyError otherwise."""
        with self._lock:
            entry = self._entries.get(name)
        if entry is None:
            raise UnknownAdapterError(name)
        if entry.state is not AdapterState.READY or entry.adapter is None:
            raise AdapterNotReadyError(f"adapter {name!r} is {entry.state.value}")
        return entry.adapter

    def add(self, name: str, path: str | Path, *, replace: bool = False, pinned: bool = False) -> LoadedAdapter:
        """Read, validate and load an adapter folder under `name`. Raises AdapterError on bad input."""
        validate_adapter_name(name)
        source = Path(path).expanduser()
        with self._lock:
            current = self._entries.get(name)
            if current is not None and current.state is AdapterState.LOADING:
                raise AdapterExistsError(f"adapter {name!r} is being loaded right now")
            if current is not None and not replace:
                raise AdapterExistsError(f"adapter {name!r} already exists; remove it first or replace it")
            if current is None and len(self._entries) >= self.max_adapters:
                raise RegistryFullError(f"the server holds {self.max_adapters} adapters already")
            if current is None:
                self._entries[name] = RegistryEntry(name, AdapterState.LOADING, source, pinned=pinned)
        try:
            folder = read_adapter_folder(source)
            validate_against_base(folder, self.base.signature)
            if folder.task == "completion" and not self.base.can_generate:
                raise AdapterError(f"completion adapter {name!r} needs a causal LM base; this base is an encoder")
            loaded = load_adapter(name, next(self._versions), folder, self.base.backend.device, self.base.backend.dtype,
                                  pinned=pinned)
        except Exception as exc:
            with self._lock:
                if current is None:
                    self._entries.pop(name, None)
            if isinstance(exc, AdapterError):
                raise
            log.exception("loading adapter %s from %s failed", name, source)
            raise AdapterError(f"adapter {name!r} could not be loaded: {type(exc).__name__}") from exc
        with self._lock:
            self._entries[name] = RegistryEntry(name, AdapterState.READY, source, loaded, pinned=pinned)
        log.info("adapter %s v%d ready (%s, rank %d, from %s)", name, loaded.version, loaded.task, loaded.rank, source)
        return loaded

    def remove(self, name: str) -> None:
        with self._lock:
            if name not in self._entries:
                raise UnknownAdapterError(name)
            del self._entries[name]
        log.info("adapter %s removed", name)
