"""Adapters by name, in two tiers: memory (an LRU of loaded adapters) <- the adapter's folder on disk.

Each entry goes loading -> ready (a failed load leaves no entry, or the previous version in place, and
the caller gets the error). A ready entry is *resident* (its weights loaded on the serving device) or
*on disk*: when more than `max_resident` adapters are resident, the least recently used one that no
request holds and that is not pinned is dropped from memory. The next request that names it re-reads
its folder, after checking that the folder still holds the adapter that was added (`folder_digest`).
The engine's device slots (LoraSlots) are the tier above this one.

Requests `acquire` an adapter for their lifetime and `release` it at the end: a held adapter is never
evicted (a request for a combination of adapters holds each parent: `acquire_all`). Loading reads and
validates outside the table lock, and the swap into the table is atomic, so a request gets either the old
version or the new one, never a half-loaded adapter; requests holding the old version of a replaced
adapter finish on it.

Runtime adds (the admin API) are checked against AdapterLimits (path inside the adapter roots, folder
size, rank) and, with a RuntimeAdapters (server/persist.py), copied into the state dir and journaled
before they are acknowledged; `restore` brings them back at the next start. Adapters given at start-up
(`startup=True`) come from the command line each time: not confined, not persisted. Adds and removes of
one name are serialized (a second one at the same time gets 409), so the journal and the table agree.
A removed or replaced adapter is `on_retire`d: the engine may then free its device slot, pinned or not.
"""

from __future__ import annotations

import collections
import contextlib
import enum
import itertools
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Protocol

from adapters import (
    AdapterError, AdapterNameError, align_to_base, folder_digest, read_adapter_folder, validate_adapter_name,
    validate_against_base,
)
from server.adapter_limits import AdapterLimits
from server.engine.base_model import BaseModel
from server.engine.loaded import LoadedAdapter, load_adapter
from server.persist import PersistedAdapter, RuntimeAdapters

log = logging.getLogger(__name__)


class AdapterState(str, enum.Enum):
    LOADING = "loading"
    READY = "ready"


@dataclass(frozen=True)
class RegistryEntry:
    name: str
    state: AdapterState
    source: Path
    pinned: bool = False
    task: str | None = None
    rank: int | None = None
    version: int | None = None
    digest: str = ""  # of the folder when added: a re-read must find the same adapter


@dataclass
class TierStats:
    """Memory-tier counters, read by the metrics collector."""

    hits: int = 0  # acquire found the adapter resident
    misses: int = 0  # acquire re-read it from disk
    evictions: int = 0  # dropped from memory (still registered, on disk)


class UnknownAdapterError(KeyError):
    pass


class AdapterNotReadyError(RuntimeError):
    pass


class AdapterExistsError(RuntimeError):
    pass


class RegistryFullError(RuntimeError):
    pass


class AdapterReader(Protocol):
    """How a backend turns a folder into what it serves (the torch engine: LoRA weights on the device)."""

    def read(self, name: str, source: Path, version: int, pinned: bool) -> LoadedAdapter:
        """Read and validate the folder; AdapterError for anything wrong with it."""

    def digest(self, source: Path) -> str:
        """A hash of the folder's files: a re-read after an eviction must find the same ones."""


class TorchAdapterReader:
    """Adapter folders for the torch engine: validated against the base, weights on its device and dtype."""

    def __init__(self, base: BaseModel) -> None:
        self.base = base

    def read(self, name: str, source: Path, version: int, pinned: bool) -> LoadedAdapter:
        folder = align_to_base(read_adapter_folder(source), self.base.signature)
        validate_against_base(folder, self.base.signature)
        if folder.task == "completion" and not self.base.can_generate:
            raise AdapterError(f"completion adapter {name!r} needs a causal LM base; this base is an encoder")
        if folder.task == "embedding" and self.base.can_generate:
            raise AdapterError(f"embedding adapter {name!r} needs an encoder base; this base is a causal LM")
        return load_adapter(name, version, folder, self.base.backend.device, self.base.backend.dtype, pinned=pinned,
                            lora_home=self.base.lora_home)

    def digest(self, source: Path) -> str:
        return folder_digest(source)


class AdapterRegistry:
    def __init__(self, base: BaseModel | None, max_adapters: int, max_resident: int | None = None,
                 on_load: Callable[[str, float], None] | None = None, reader: AdapterReader | None = None, *,
                 limits: AdapterLimits | None = None, reserved_names: Iterable[str] = (),
                 persist: RuntimeAdapters | None = None,
                 on_retire: Callable[[LoadedAdapter], None] | None = None) -> None:
        """`max_adapters`: registered at most; `max_resident`: kept in memory (None: all of them);
        `on_load(result, seconds)`: called after every folder read (metrics); `reader`: how folders are
        read (default: adapter folders for the torch engine on `base`); `limits`: what a runtime add may
        load (default: any path, default sizes); `reserved_names`: model ids no adapter may take (the
        base's); `persist`: where runtime adds are kept across restarts (None: nowhere);
        `on_retire(adapter)`: a removed or replaced version (default: free its device slot on `base`)."""
        if reader is None:
            if base is None:
                raise ValueError("AdapterRegistry needs a base or a reader")
            reader = TorchAdapterReader(base)
        if on_retire is None and base is not None and base.active.slots is not None:
            on_retire = base.active.slots.retire
        self.reader = reader
        self.limits = limits or AdapterLimits()
        self.reserved_names = frozenset(reserved_names)
        self.persist = persist
        self.on_retire = on_retire
        self._admin_locks: collections.defaultdict[str, threading.Lock] = collections.defaultdict(threading.Lock)
        self.max_adapters = max_adapters
        self.max_resident = max_resident or max_adapters
        self.on_load = on_load
        self.stats = TierStats()
        self._entries: dict[str, RegistryEntry] = {}
        self._resident: collections.OrderedDict[str, LoadedAdapter] = collections.OrderedDict()  # LRU order
        self._holds: collections.Counter[int] = collections.Counter()  # id(adapter) -> requests holding it
        self._lock = threading.Lock()
        self._reload_locks: collections.defaultdict[str, threading.Lock] = collections.defaultdict(threading.Lock)
        self._versions = itertools.count(1)

    def entries(self) -> list[RegistryEntry]:
        with self._lock:
            return list(self._entries.values())

    def names(self) -> list[str]:
        return [e.name for e in self.entries()]

    def ready_count(self) -> int:
        return sum(e.state is AdapterState.READY for e in self.entries())

    def resident_count(self) -> int:
        with self._lock:
            return len(self._resident)

    def is_resident(self, name: str) -> bool:
        with self._lock:
            return name in self._resident

    # -- requests --------------------------------------------------------------------------------

    def acquire(self, name: str) -> LoadedAdapter:
        """The ready adapter called `name`, held until `release`; re-read from disk if it was evicted.
        Raises UnknownAdapterError, or AdapterNotReadyError (loading, or its folder changed or vanished)."""
        while True:
            entry = self._ready_entry(name)
            adapter = self._hold_resident(entry)
            if adapter is not None:
                return adapter
            with self._reload_locks[name]:  # one re-read per adapter at a time; the others wait for it
                adapter = self._hold_resident(entry)
                if adapter is not None:
                    return adapter
                loaded = self._reload(entry)
                with self._lock:
                    if self._entries.get(name) is not entry:  # removed or replaced while we read: look again
                        continue
                    self._resident[name] = loaded
                    self._holds[id(loaded)] += 1
                    self.stats.misses += 1
                    self._evict_over_budget()
                return loaded

    def acquire_all(self, names: Iterable[str]) -> list[LoadedAdapter]:
        """acquire() each of `names` (a combination's parents), all held until each is released; if one
        fails, those already held are released and the error is raised."""
        held: list[LoadedAdapter] = []
        try:
            for name in names:
                held.append(self.acquire(name))
        except BaseException:
            for adapter in held:
                self.release(adapter)
            raise
        return held

    def release(self, adapter: LoadedAdapter | None) -> None:
        if adapter is None:
            return
        with self._lock:
            key = id(adapter)
            self._holds[key] -= 1
            if self._holds[key] <= 0:
                del self._holds[key]
            self._evict_over_budget()

    def resolve(self, name: str) -> LoadedAdapter:
        """acquire() without a hold, for callers that keep no request open (tests, tools)."""
        adapter = self.acquire(name)
        self.release(adapter)
        return adapter

    def _ready_entry(self, name: str) -> RegistryEntry:
        with self._lock:
            entry = self._entries.get(name)
        if entry is None:
            raise UnknownAdapterError(name)
        if entry.state is not AdapterState.READY:
            raise AdapterNotReadyError(f"adapter {name!r} is {entry.state.value}")
        return entry

    def _hold_resident(self, entry: RegistryEntry) -> LoadedAdapter | None:
        with self._lock:
            adapter = self._resident.get(entry.name)
            if adapter is None or adapter.version != entry.version:
                return None
            self._resident.move_to_end(entry.name)
            self._holds[id(adapter)] += 1
            self.stats.hits += 1
            return adapter

    def _reload(self, entry: RegistryEntry) -> LoadedAdapter:
        started = time.perf_counter()
        try:
            if self.reader.digest(entry.source) != entry.digest:
                raise AdapterError("its files changed since it was added")
            loaded = self._read(entry.name, entry.source, entry.version, entry.pinned)
        except AdapterError as exc:
            self._observe_load("error", started)
            raise AdapterNotReadyError(
                f"adapter {entry.name!r} was dropped from memory and cannot be re-read from {str(entry.source)!r} "
                f"({exc}); add it again"
            ) from exc
        self._observe_load("reload", started)
        log.info("adapter %s v%d re-read from %s", entry.name, loaded.version, entry.source)
        return loaded

    def _evict_over_budget(self) -> None:
        """Drop least recently used adapters that nobody holds and nobody pinned (caller holds the lock)."""
        excess = len(self._resident) - self.max_resident
        for name in list(self._resident):
            if excess <= 0:
                return
            adapter = self._resident[name]
            if adapter.pinned or self._holds[id(adapter)] > 0:
                continue
            del self._resident[name]
            self.stats.evictions += 1
            excess -= 1

    # -- admin -----------------------------------------------------------------------------------

    def add(self, name: str, path: str | Path, *, replace: bool = False, pinned: bool = False,
            startup: bool = False, version: int | None = None) -> LoadedAdapter:
        """Read, validate and load an adapter folder under `name`. Raises AdapterError on bad input.
        A runtime add (`startup=False`) must pass the limits' path check and, with `persist`, is copied
        into the state dir and journaled before it is served and this returns. `version`: the number to
        give it instead of this registry's next one (a Ray replica serves the cluster catalog's numbers)."""
        self.check_name(name)
        source = Path(path).expanduser()
        if not startup:
            source = self.limits.check_path(source)
        self.limits.check_size(source)
        with self._changing(name):
            return self._add(name, source, replace, pinned, persist=not startup and self.persist is not None,
                             version=version)

    def _add(self, name: str, source: Path, replace: bool, pinned: bool, persist: bool,
             version: int | None = None) -> LoadedAdapter:
        with self._lock:
            current = self._entries.get(name)
            if current is not None and not replace:
                raise AdapterExistsError(f"adapter {name!r} already exists; remove it first or replace it")
            if current is None and len(self._entries) >= self.max_adapters:
                raise RegistryFullError(f"the server holds {self.max_adapters} adapters already")
            if current is None:
                self._entries[name] = RegistryEntry(name, AdapterState.LOADING, source, pinned=pinned)
        started = time.perf_counter()
        staged = ""
        try:
            digest = self.reader.digest(source) if source.is_dir() else ""
            serve_from = source
            if persist and digest:
                serve_from, staged = self.persist.stage(source, digest, self.reader.digest), digest
            loaded = self._read(name, serve_from, next(self._versions) if version is None else version, pinned)
            self.limits.check_rank(name, loaded.rank)
            if persist:  # the commit point: from here the add is acknowledged, and survives a restart
                self.persist.commit(PersistedAdapter(name, digest, pinned, loaded.version, str(source)))
                staged = ""
        except Exception as exc:
            self._observe_load("error", started)
            if staged:
                self.persist.unstage(staged)
            with self._lock:
                if current is None:
                    self._entries.pop(name, None)
            if isinstance(exc, AdapterError):
                raise
            log.exception("loading adapter %s from %s failed", name, source)
            raise AdapterError(f"adapter {name!r} could not be loaded: {type(exc).__name__}") from exc
        self._observe_load("ok", started)
        self._install(RegistryEntry(name, AdapterState.READY, serve_from, pinned, loaded.task, loaded.rank,
                                    loaded.version, digest), loaded)
        log.info("adapter %s v%d ready (%s, rank %d, from %s)", name, loaded.version, loaded.task, loaded.rank, source)
        return loaded

    def remove(self, name: str) -> None:
        """Unregister `name` (and drop it from the state dir). A name the state dir holds but that was not
        restored (it no longer validated) is removed from the state dir too."""
        with self._changing(name):
            with self._lock:
                registered = name in self._entries
            forgotten = self.persist.forget(name) if self.persist is not None else False  # durable first
            if not registered and not forgotten:
                raise UnknownAdapterError(name)
            with self._lock:
                self._entries.pop(name, None)
                old = self._resident.pop(name, None)  # requests holding it finish on their reference
            self._retire(old)
        log.info("adapter %s removed", name)

    def restore(self) -> list[str]:
        """Register the runtime adapters the state dir holds (call once, at start-up, after the start-up
        adapters: a runtime replace of one of those wins, it was acknowledged later). An entry that no
        longer validates (changed copy, tightened limits, a name now reserved) is logged and skipped, and
        kept in the state dir for a later start; start-up never fails here."""
        if self.persist is None:
            return []
        restored, top_version = [], 0
        for record in self.persist.recover():
            top_version = max(top_version, record.version)
            try:
                loaded, path = self._read_record(record)
            except Exception as exc:  # noqa: BLE001: whatever is wrong with one entry, the server starts
                log.warning("runtime adapter %s (added from %s) not restored: %s", record.name, record.source, exc)
                continue
            with self._lock:
                full = record.name not in self._entries and len(self._entries) >= self.max_adapters
            if full:
                log.warning("runtime adapter %s not restored: the server holds %d adapters already",
                            record.name, self.max_adapters)
                continue
            self._install(RegistryEntry(record.name, AdapterState.READY, path, record.pinned, loaded.task,
                                        loaded.rank, loaded.version, record.digest), loaded)
            restored.append(record.name)
        with self._lock:  # versions keep growing across restarts: a replace never reuses a restored number
            self._versions = itertools.count(max(top_version + 1, next(self._versions)))
        if restored:
            log.info("restored %d runtime adapters from %s: %s", len(restored), self.persist.folder, restored)
        return restored

    def check_name(self, name: str) -> None:
        """AdapterNameError unless `name` is a safe adapter name that is not a reserved model id."""
        validate_adapter_name(name)
        if name in self.reserved_names:
            raise AdapterNameError(f"adapter name {name!r} is the base model's own name: requests for {name!r} "
                                   "get the base without an adapter; choose another name")

    def _read_record(self, record: PersistedAdapter) -> tuple[LoadedAdapter, Path]:
        self.check_name(record.name)
        path = self.persist.path_of(record.digest)
        if self.reader.digest(path) != record.digest:
            raise AdapterError(f"its stored copy {str(path)!r} no longer matches the digest it was added with")
        self.limits.check_size(path)
        loaded = self._read(record.name, path, record.version, record.pinned)
        self.limits.check_rank(record.name, loaded.rank)
        return loaded, path

    def _install(self, entry: RegistryEntry, loaded: LoadedAdapter) -> None:
        """Swap `entry` in (atomically for requests); the version it replaces is retired."""
        with self._lock:
            self._entries[entry.name] = entry
            old = self._resident.get(entry.name)
            self._resident[entry.name] = loaded
            self._resident.move_to_end(entry.name)
            self._evict_over_budget()
        if old is not loaded:
            self._retire(old)

    def _retire(self, adapter: LoadedAdapter | None) -> None:
        if adapter is not None and self.on_retire is not None:
            self.on_retire(adapter)

    @contextlib.contextmanager
    def _changing(self, name: str) -> Iterator[None]:
        """One add or remove of `name` at a time; a second one meanwhile is refused, not queued."""
        lock = self._admin_locks[name]
        if not lock.acquire(blocking=False):
            raise AdapterExistsError(f"adapter {name!r} is being added, replaced or removed right now; try again")
        try:
            yield
        finally:
            lock.release()

    def _read(self, name: str, source: Path, version: int, pinned: bool) -> LoadedAdapter:
        return self.reader.read(name, source, version, pinned)

    def _observe_load(self, result: str, started: float) -> None:
        if self.on_load is not None:
            self.on_load(result, time.perf_counter() - started)
