"""One engine replica's work, without Ray: the single server's app (build_state + create_app, the same app
factory) and the replica's share of the catalog (ReplicaAdapters). engine.py puts it in a Ray Serve
deployment; tests run it in process.

A forwarded request: its adapters are held in a window (`using`), Ray's multiplexing is told the request's
`model` (the `multiplexed` callback), the adapters are loaded at the catalog's versions (`ensure`), then the
app answers exactly as the single server would, with `x-loraplex-replica` added.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import tempfile
from pathlib import Path
from typing import AsyncIterator, Awaitable, Callable

from fastapi import FastAPI

from adapters import AdapterError
from server.api.app import build_state, create_app
from server.api.state import AppState
from server.config import ServerConfig
from server.ray.bridge import error_pieces, run_asgi
from server.ray.catalog import failure_of
from server.ray.replica_adapters import AdapterLoadFailed, ReplicaAdapters
from server.ray.wire import AdminFailure, BaseCard, ForwardedRequest, ResponseStart, StagedAdapter, Validated
from server.registry import AdapterExistsError, RegistryFullError

log = logging.getLogger(__name__)

REPLICA_HEADER = b"x-loraplex-replica"  # which replica answered


class EngineStartError(RuntimeError):
    """What the user can fix about a replica's start (the base, --quant, a key file): one line."""


class Replica:
    def __init__(self, state: AppState, app: FastAPI, name: str, private_dir: Path) -> None:
        self.state, self.app, self.name = state, app, name
        self.adapters = ReplicaAdapters(state.registry)
        self.headers = ((REPLICA_HEADER, name.encode()),)
        self._private = private_dir
        self._lifespan = app.router.lifespan_context(app)

    @classmethod
    async def start(cls, config: ServerConfig, threads: int, name: str) -> "Replica":
        """Build the replica from the user's config: its --adapter ones belong to the catalog, runtime adds are
        the catalog's to journal (port 0 here), and its admin token goes to a state dir of its own. The
        base loads in a thread; the lifespan then starts the model workers, as in the single server."""
        private = Path(tempfile.mkdtemp(prefix="loraplex-replica-"))
        local = config.model_copy(update={"adapters": {}, "port": 0, "state_dir": private, "threads": threads})
        try:
            state = await asyncio.to_thread(build_state, local)
            app = create_app(local, state=state)
        except (ValueError, AdapterExistsError, RegistryFullError) as exc:
            shutil.rmtree(private, ignore_errors=True)
            raise EngineStartError(str(exc).splitlines()[0]) from None
        replica = cls(state, app, name, private)
        await replica._lifespan.__aenter__()
        return replica

    async def handle(self, request: ForwardedRequest, model_id: str,
                     multiplexed: Callable[[str], Awaitable[object]] | None = None
                     ) -> AsyncIterator[ResponseStart | bytes]:
        entries = dict(request.entries)
        async with self.adapters.using(entries):
            if model_id and multiplexed is not None:
                await multiplexed(model_id)
            try:
                await self.adapters.ensure(entries)
            except AdapterLoadFailed as exc:
                log.error("%s", exc)
                for piece in error_pieces(409, str(exc), "conflict_error", self.headers):
                    yield piece
                return
            async for piece in run_asgi(self.app, request, self.headers):
                yield piece

    async def validate(self, staged: StagedAdapter) -> Validated | AdminFailure:
        """Read `staged` as the registry would (base, task and rank checks) and let it go: it is loaded for
        serving on first use, once the catalog has acknowledged it."""
        return await asyncio.to_thread(self._validate, staged)

    def _validate(self, staged: StagedAdapter) -> Validated | AdminFailure:
        registry = self.state.registry
        try:
            registry.check_name(staged.name)
            loaded = registry.reader.read(staged.name, Path(staged.path), staged.version, staged.pinned)
            registry.limits.check_rank(staged.name, loaded.rank)
        except AdapterError as exc:
            return failure_of(exc)
        except Exception as exc:  # noqa: BLE001: a folder that breaks the reader is the add's failure
            log.exception("validating adapter %s from %s failed", staged.name, staged.path)
            return failure_of(AdapterError(f"adapter {staged.name!r} could not be loaded: {type(exc).__name__}"))
        return Validated(loaded.task, loaded.rank)

    async def retire(self, name: str, below: int | None) -> str:
        await self.adapters.retire(name, below)
        return self.name

    def base_card(self) -> BaseCard:
        state = self.state
        task = "completion" if state.base.can_generate else "classification"
        return BaseCard(state.served_name, str(state.base.prepared.path), task, state.started_at)

    def check_health(self) -> None:
        """RuntimeError naming a dead model worker thread (what the single server's /health answers 503 for)."""
        for worker in (self.state.scheduler, self.state.classifier):
            if worker is not None and (worker.failure is not None or not worker.alive):
                raise RuntimeError(f"model worker thread died: {worker.failure or 'unknown'}")

    async def stop(self) -> None:
        """Stop the workers (each answers what it still holds), remove the private state dir."""
        try:
            await self._lifespan.__aexit__(None, None, None)
        finally:
            shutil.rmtree(self._private, ignore_errors=True)
