"""An engine replica's share of the catalog: the adapters it has used, in its own registry (the one build_state
makes, the single server's) at the catalog's versions.

A request arrives with the catalog's entries for the adapters its `model` names, read when the ingress routed
it. Before the app sees the request, `ensure` makes the registry agree: an entry newer than what the replica
holds is loaded from the entry's path (the shared store), replacing the older one; a name the catalog does not
have is dropped, so the app answers it as the single server would (404, or 400 in a combination). A version
the replica holds already, or a newer one, is kept: the request was routed just before a replace that this
replica has seen, and either version is one the single server could have given a request racing a replace.

`retire(name, below)` drops a version the catalog has moved past (its broadcast after a replace or remove) or
that Ray's multiplexing evicted (`evicted=True`: skipped while the name is still multiplexed here, or pinned).
It waits while any request is between its `ensure` and its end (`using`): dropping the entry in between would
404 a request that was routed to this version. Requests already admitted hold their LoadedAdapter and finish
on it whatever happens to the entry (the registry's rule).

Versions: each load is given the catalog's number (`AdapterRegistry.add(version=...)`), so
x-loraplex-adapter-version and the admin API speak of the same versions on every replica.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from pathlib import Path
from typing import AsyncIterator, Callable, Iterable, Mapping

from adapters import AdapterError
from server.ray.wire import CatalogEntry
from server.registry import AdapterRegistry, UnknownAdapterError

log = logging.getLogger(__name__)

class AdapterLoadFailed(Exception):
    """The replica could not load a catalog entry (its file changed, the shared store is not mounted here...)."""


class MuxToken:
    """What Ray's multiplexing caches per model id on this replica. Ray calls `__del__` when its LRU evicts the
    id (in an executor thread); so may the garbage collector later, hence `_released`."""

    def __init__(self, model_id: str, names: tuple[str, ...], on_release: Callable[[tuple[str, ...]], None],
                 loop: asyncio.AbstractEventLoop) -> None:
        self.model_id, self.names = model_id, names
        self._on_release, self._loop = on_release, loop
        self._released = False

    def __del__(self) -> None:
        if self._released:
            return
        self._released = True
        if not self._loop.is_closed():  # a replica shutting down has nothing left to release
            self._loop.call_soon_threadsafe(self._on_release, self.names)


class ReplicaAdapters:
    def __init__(self, registry: AdapterRegistry) -> None:
        self.registry = registry
        self.held: dict[str, CatalogEntry] = {}  # what the registry holds, as the catalog described it
        self.loads: collections.Counter[str] = collections.Counter()  # folder reads per adapter (metrics)
        self._locks: collections.defaultdict[str, asyncio.Lock] = collections.defaultdict(asyncio.Lock)
        self._window: collections.Counter[str] = collections.Counter()  # requests between ensure and their end
        self._pending: dict[str, int | None] = {}  # catalog retires waiting for a window to close: name -> below
        self._pending_evictions: set[str] = set()  # multiplexing evictions waiting likewise
        self._multiplexed: collections.Counter[str] = collections.Counter()  # live MuxTokens naming each adapter
        self._tasks: set[asyncio.Task] = set()

    # -- requests --------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def using(self, names: Iterable[str]) -> AsyncIterator[None]:
        """A request's window on `names`, from before its `ensure` to its end: retires wait for it."""
        names = tuple(names)
        for name in names:
            self._window[name] += 1
        try:
            yield
        finally:
            for name in names:
                self._window[name] -= 1
                if self._window[name] <= 0:
                    del self._window[name]
                    self._retire_later(name)

    async def ensure(self, entries: Mapping[str, CatalogEntry | None]) -> None:
        """Make the registry hold each entry (or a newer version of it) and drop each name mapped to None.
        AdapterLoadFailed if an entry cannot be loaded here."""
        for name, entry in entries.items():
            async with self._locks[name]:
                held = self.held.get(name)
                if entry is None:
                    if held is not None:
                        await self._drop(name)
                    continue
                if held is not None and _covers(held, entry):
                    continue
                try:
                    await asyncio.to_thread(self._load, entry)
                except AdapterError as exc:
                    raise AdapterLoadFailed(f"adapter {name!r} v{entry.version} could not be loaded on this "
                                            f"replica from {entry.path!r} ({exc})") from exc

    def token(self, model_id: str, names: tuple[str, ...]) -> MuxToken:
        """A MuxToken for Ray's multiplexing cache; while one names an adapter, evictions leave it alone."""
        for name in names:
            self._multiplexed[name] += 1
        return MuxToken(model_id, names, self._released, asyncio.get_running_loop())

    # -- retirement ------------------------------------------------------------------------------

    async def retire(self, name: str, below: int | None, evicted: bool = False) -> None:
        """Drop `name` if the held version is older than `below` (None: any), now or when no request is in
        its window. `evicted`: Ray's LRU let go of it, which a later MuxToken or a pin overrules."""
        if self._window[name] > 0:
            if evicted:
                self._pending_evictions.add(name)
            else:
                self._pending[name] = _stricter(self._pending[name], below) if name in self._pending else below
            return
        async with self._locks[name]:
            held = self.held.get(name)
            if held is None or (below is not None and held.version >= below):
                return
            if evicted and (held.pinned or self._multiplexed[name] > 0):
                return
            await self._drop(name)

    def _released(self, names: tuple[str, ...]) -> None:
        for name in names:
            self._multiplexed[name] -= 1
            if self._multiplexed[name] <= 0:
                del self._multiplexed[name]
                self._pending_evictions.add(name)
                self._retire_later(name)

    def _retire_later(self, name: str) -> None:
        """Run the retires that waited for `name`'s window, once it is closed."""
        if self._window[name]:
            return
        if name in self._pending:
            self._spawn(self.retire(name, self._pending.pop(name)))
        if name in self._pending_evictions:
            self._pending_evictions.discard(name)
            self._spawn(self.retire(name, None, evicted=True))

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- registry work (threads) -----------------------------------------------------------------

    def _load(self, entry: CatalogEntry) -> None:
        if self.registry.reader.digest(Path(entry.path)) != entry.digest:
            raise AdapterError("its files changed since it was added; add it again")
        self.registry.add(entry.name, entry.path, replace=True, pinned=entry.pinned, startup=True,
                          version=entry.version)
        self.held[entry.name] = entry
        self.loads[entry.name] += 1
        log.info("adapter %s v%d loaded from %s", entry.name, entry.version, entry.path)

    async def _drop(self, name: str) -> None:
        self.held.pop(name, None)
        await asyncio.to_thread(self._remove, name)

    def _remove(self, name: str) -> None:
        with contextlib.suppress(UnknownAdapterError):  # never loaded here, or dropped already
            self.registry.remove(name)
        log.info("adapter %s dropped", name)


def _covers(held: CatalogEntry, wanted: CatalogEntry) -> bool:
    """Whether the held copy serves a request routed with `wanted`: the same version, or a newer one."""
    return held.version > wanted.version or (held.version == wanted.version and held.digest == wanted.digest)


def _stricter(a: int | None, b: int | None) -> int | None:
    """Two pending catalog retires as one: None (any version) beats a bound, a higher bound a lower one."""
    return None if a is None or b is None else max(a, b)
