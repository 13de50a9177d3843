"""The catalog (server/ray/catalog.py) as a one-replica Ray Serve deployment, talking to the engine replicas
through their deployment handle: `validate` goes to one replica, `retire` is broadcast to every live one."""

from __future__ import annotations

import asyncio
import logging

from ray.serve.handle import DeploymentHandle

from server.adapter_limits import AdapterLimits, default_adapter_roots
from server.config import ServerConfig
from server.persist import RuntimeAdapters
from server.ray.catalog import AdapterCatalog
from server.ray.options import catalog_state_dir
from server.ray.wire import AdminFailure, CatalogEntry, StagedAdapter, Validated

log = logging.getLogger(__name__)

RETIRE_TIMEOUT_S = 30.0  # a replica that cannot answer a broadcast this long is not serving anyway


class HandleEngineControl:
    """EngineControl over the engine deployment's handle."""

    def __init__(self, engine: DeploymentHandle) -> None:
        self.engine = engine

    async def validate(self, staged: StagedAdapter) -> Validated | AdminFailure:
        return await self.engine.validate.remote(staged)

    async def retire(self, name: str, below: int | None) -> None:
        try:
            answers = await self.engine.broadcast("retire", name, below).results_async(
                timeout_s=RETIRE_TIMEOUT_S, return_exceptions=True)
        except TimeoutError:
            log.warning("retiring adapter %s: not every replica answered within %g s", name, RETIRE_TIMEOUT_S)
            return
        failed = [a for a in answers if isinstance(a, BaseException)]
        if failed:  # a replica that died meanwhile holds nothing any more; one that answered nothing is logged
            log.warning("retiring adapter %s: %d of %d replicas failed: %s", name, len(failed), len(answers), failed[0])


class CatalogDeployment:
    async def __init__(self, engine: DeploymentHandle, config: ServerConfig, fingerprint: str, app_name: str) -> None:
        """`config.port` 0 journals nothing (as the single server on port 0); the state dir is shared by the
        cluster's nodes when replicas run on more than one."""
        roots = tuple(config.adapter_roots) or default_adapter_roots(config.adapters.values(), config.state_dir)
        limits = AdapterLimits(roots=roots, max_bytes=config.max_adapter_bytes, max_rank=config.max_lora_rank)
        persist = None
        if config.port:
            persist = RuntimeAdapters(catalog_state_dir(config, app_name, fingerprint), fingerprint)
        else:
            log.warning("port 0: adapters added at run time will not survive a restart")
        self.catalog = AdapterCatalog(HandleEngineControl(engine), limits, config.max_adapters, persist,
                                      config.adapters)
        self._startup = asyncio.get_running_loop().create_task(self.catalog.check_startup())

    async def startup_report(self) -> list[str]:
        """The start-up adapters that failed validation (waits for the check, which waits for a replica)."""
        return await asyncio.shield(self._startup)

    async def resolve(self, names: tuple[str, ...]) -> dict[str, CatalogEntry | None]:
        return self.catalog.resolve(names)

    async def entries(self) -> list[CatalogEntry]:
        return self.catalog.entries()

    async def add(self, name: str, path: str, replace: bool, pinned: bool) -> CatalogEntry | AdminFailure:
        return await self.catalog.add(name, path, replace=replace, pinned=pinned)

    async def remove(self, name: str) -> AdminFailure | None:
        return await self.catalog.remove(name)
