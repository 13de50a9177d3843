"""The cluster's adapter catalog: which adapters exist, at which version, read from where.

Why a catalog beside the replicas' own registries: a replica loads an adapter on first use (Ray routes an
adapter's requests to the replicas that hold it), so no replica knows every adapter. The catalog does, and it
applies the single server's admin rules once for the whole cluster:

- add: the name, the path (inside --adapter-root) and the size are checked here; the folder is copied into the
  shared store and journaled (server/persist.py's RuntimeAdapters, in the state dir: a shared file system on a
  multi-node cluster); one engine replica reads it and validates it against the base before the add is
  acknowledged. One version counter for the cluster, here.
- replace: the same, then every replica retires the older version. A request keeps the version it was
  admitted with (the registry's rule on its replica); a request routed after the acknowledgement carries the
  new entry, so whichever replica it reaches loads the new version first.
- remove: the journal first, then every replica drops it.

One admin change per name at a time (a second one meanwhile gets 409), as in the single server. This class is
plain asyncio (server/ray/catalog_deployment.py runs it as a one-replica Serve deployment); file work runs
in threads. It talks to the replicas through `EngineControl` only, so tests drive it without Ray.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from pathlib import Path
from typing import Iterable, Mapping, Protocol

from adapters import AdapterError, folder_digest, read_adapter_folder, validate_adapter_name
from server.adapter_limits import AdapterLimits
from server.api.errors import adapter_error
from server.persist import PersistedAdapter, RuntimeAdapters
from server.ray.wire import AdminFailure, CatalogEntry, StagedAdapter, Validated
from server.registry import AdapterExistsError, RegistryFullError, UnknownAdapterError

log = logging.getLogger(__name__)


class EngineControl(Protocol):
    """The catalog's view of the engine replicas."""

    async def validate(self, staged: StagedAdapter) -> Validated | AdminFailure:
        """One replica reads the staged folder and checks it against the base (and the rank limit)."""

    async def retire(self, name: str, below: int | None) -> None:
        """Every replica drops its copy of `name` older than version `below` (None: any version)."""


def failure_of(exc: Exception) -> AdminFailure:
    """The answer the single server's error handlers (server/api/errors.py) give for the same exception."""
    error = adapter_error(exc)
    if error is None:
        raise TypeError(f"no admin answer for {type(exc).__name__}") from exc
    return AdminFailure(error.status, error.message, error.kind)


def busy(name: str) -> AdminFailure:
    return failure_of(AdapterExistsError(f"adapter {name!r} is being added, replaced or removed right now; try again"))


class AdapterCatalog:
    def __init__(self, engine: EngineControl, limits: AdapterLimits, max_adapters: int,
                 persist: RuntimeAdapters | None = None, startup: Mapping[str, str] | None = None) -> None:
        """`limits`: what a runtime add may load (roots, bytes, rank); `persist`: the journal and store of
        runtime adds (None: nothing survives a restart, and replicas read runtime adds from their own path);
        `startup`: the --adapter NAME=PATH ones, registered at once and validated by `check_startup`."""
        self.engine = engine
        self.limits = limits
        self.max_adapters = max_adapters
        self.persist = persist
        self._entries: dict[str, CatalogEntry] = {}
        self._busy: set[str] = set()
        self._next_version = 1
        self._startup_failures: list[str] = []
        for name, path in (startup or {}).items():
            self._register_startup(name, path)
        self._restore()

    # -- reads -----------------------------------------------------------------------------------

    def resolve(self, names: Iterable[str]) -> dict[str, CatalogEntry | None]:
        return {name: self._entries.get(name) for name in names}

    def entries(self) -> list[CatalogEntry]:
        return list(self._entries.values())

    # -- admin -----------------------------------------------------------------------------------

    async def add(self, name: str, path: str, *, replace: bool = False,
                  pinned: bool = False) -> CatalogEntry | AdminFailure:
        try:
            validate_adapter_name(name)
        except AdapterError as exc:
            return failure_of(exc)
        if name in self._busy:
            return busy(name)
        self._busy.add(name)
        try:
            return await self._add(name, path, replace, pinned)
        finally:
            self._busy.discard(name)

    async def remove(self, name: str) -> AdminFailure | None:
        """Unregister `name` (journal first) and have every replica drop it; None once done."""
        if name in self._busy:
            return busy(name)
        self._busy.add(name)
        try:
            forgotten = False
            if self.persist is not None:
                forgotten = await asyncio.to_thread(self.persist.forget, name)
            if self._entries.pop(name, None) is None and not forgotten:
                return failure_of(UnknownAdapterError(name))
            await self.engine.retire(name, None)
            log.info("adapter %s removed", name)
            return None
        finally:
            self._busy.discard(name)

    async def check_startup(self) -> list[str]:
        """Have a replica validate every entry not validated yet (--adapter ones, restored ones): the ones that
        fail are dropped from the catalog (a restored one stays in the journal, as the single server keeps it
        in the state dir). One line per failure, for the CLI (which then exits 2)."""
        failures = list(self._startup_failures)
        for entry in [e for e in self._entries.values() if e.task is None]:
            result = await self.engine.validate(_staged(entry))
            if self._entries.get(entry.name) is not entry:  # replaced or removed meanwhile
                continue
            if isinstance(result, AdminFailure):
                failures.append(f"adapter {entry.name!r} ({entry.source}): {result.message}")
                del self._entries[entry.name]
                log.error("adapter %s dropped: %s", entry.name, result.message)
            else:
                self._entries[entry.name] = dataclasses.replace(entry, task=result.task, rank=result.rank)
        return failures

    # -- internals -------------------------------------------------------------------------------

    async def _add(self, name: str, path: str, replace: bool, pinned: bool) -> CatalogEntry | AdminFailure:
        current = self._entries.get(name)
        if current is not None and not replace:
            return failure_of(AdapterExistsError(f"adapter {name!r} already exists; remove it first or replace it"))
        if current is None and len(self._entries) >= self.max_adapters:
            return failure_of(RegistryFullError(f"the server holds {self.max_adapters} adapters already"))
        version = self._take_version()
        try:
            staged = await asyncio.to_thread(self._stage, name, path, version, pinned)
        except AdapterError as exc:
            return failure_of(exc)
        except Exception as exc:  # noqa: BLE001: a disk error is the add's failure, never the catalog's
            log.exception("staging adapter %s from %s failed", name, path)
            return failure_of(AdapterError(f"adapter {name!r} could not be loaded: {type(exc).__name__}"))
        validated = await self.engine.validate(staged)
        if isinstance(validated, AdminFailure):
            await asyncio.to_thread(self._unstage, staged)
            return validated
        try:
            await asyncio.to_thread(self._commit, staged)
        except Exception as exc:  # noqa: BLE001: the journal could not be written: refused, nothing changed
            log.exception("journaling adapter %s failed", name)
            await asyncio.to_thread(self._unstage, staged)
            return failure_of(AdapterError(f"adapter {name!r} could not be loaded: {type(exc).__name__}"))
        entry = CatalogEntry(name, version, staged.path, staged.digest, pinned, staged.source, validated.task,
                             validated.rank)
        self._entries[name] = entry
        if current is not None:
            await self.engine.retire(name, version)
        log.info("adapter %s v%d ready (%s, rank %d, from %s)", name, version, entry.task, entry.rank, entry.source)
        return entry

    def _stage(self, name: str, path: str, version: int, pinned: bool) -> StagedAdapter:
        source = self.limits.check_path(Path(path).expanduser())
        if not source.is_dir():
            read_adapter_folder(source)  # says what is wrong with the path
            raise AdapterError(f"adapter path {path!r} is not a folder")
        self.limits.check_size(source)
        digest = folder_digest(source)
        serve_from = source
        if self.persist is not None:
            serve_from = self.persist.stage(source, digest, folder_digest)
        return StagedAdapter(name, version, str(serve_from), digest, pinned, str(source))

    def _unstage(self, staged: StagedAdapter) -> None:
        if self.persist is not None:
            self.persist.unstage(staged.digest)

    def _commit(self, staged: StagedAdapter) -> None:
        if self.persist is not None:
            self.persist.commit(PersistedAdapter(staged.name, staged.digest, staged.pinned, staged.version,
                                                 staged.source))

    def _take_version(self) -> int:
        version, self._next_version = self._next_version, self._next_version + 1
        return version

    def _register_startup(self, name: str, path: str) -> None:
        """An --adapter one: served from its own folder (not confined, not journaled), as the single server does."""
        source = Path(path).expanduser().absolute()
        try:
            validate_adapter_name(name)
            if not source.is_dir():
                read_adapter_folder(source)
                raise AdapterError(f"adapter path {path!r} is not a folder")
            self.limits.check_size(source)
            digest = folder_digest(source)
        except AdapterError as exc:
            self._startup_failures.append(f"adapter {name!r} ({path}): {exc}")
            return
        self._entries[name] = CatalogEntry(name, self._take_version(), str(source), digest, source=str(source),
                                           startup=True)

    def _restore(self) -> None:
        """The journal's adapters (a runtime replace of an --adapter one wins: it was acknowledged later).
        An entry whose stored copy no longer matches is logged and skipped, never fatal."""
        if self.persist is None:
            return
        top = 0
        for record in self.persist.recover():
            top = max(top, record.version)
            path = self.persist.path_of(record.digest)
            try:
                if folder_digest(path) != record.digest:
                    raise AdapterError(f"its stored copy {str(path)!r} no longer matches the digest it was added with")
                self.limits.check_size(path)
            except AdapterError as exc:
                log.warning("runtime adapter %s (added from %s) not restored: %s", record.name, record.source, exc)
                continue
            if record.name not in self._entries and len(self._entries) >= self.max_adapters:
                log.warning("runtime adapter %s not restored: the server holds %d adapters already",
                            record.name, self.max_adapters)
                continue
            self._entries[record.name] = CatalogEntry(record.name, record.version, str(path), record.digest,
                                                      record.pinned, record.source)
        self._next_version = max(self._next_version, top + 1)
        if top:
            log.info("restored runtime adapters from %s: %s", self.persist.folder,
                     sorted(e.name for e in self._entries.values() if not e.startup))


def _staged(entry: CatalogEntry) -> StagedAdapter:
    return StagedAdapter(entry.name, entry.version, entry.path, entry.digest, entry.pinned, entry.source)
