"""The ingress deployment: router_app.py's app on a Cluster made of the engine and catalog deployments' handles."""

from __future__ import annotations

from typing import AsyncIterator

from fastapi import FastAPI
from ray.exceptions import RayError, RayTaskError
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from server.config import ServerConfig
from server.ray.router_app import create_router_app
from server.ray.wire import (
    AdminFailure, Backpressure, BaseCard, CatalogEntry, ForwardedRequest, ReplicaInfo, ReplicaLost, ResponseStart,
)

DESCRIBE_TIMEOUT_S = 10.0
LOST = "the engine replica serving this request stopped before it answered in full"


class HandleCluster:
    """router_app's Cluster over Ray Serve handles."""

    def __init__(self, engine: DeploymentHandle, catalog: DeploymentHandle) -> None:
        self.engine = engine
        self.catalog = catalog

    async def resolve(self, names: tuple[str, ...]) -> dict[str, CatalogEntry | None]:
        return await self.catalog.resolve.remote(names)

    async def forward(self, request: ForwardedRequest, model_id: str) -> AsyncIterator[ResponseStart | bytes]:
        handle = self.engine.options(stream=True, multiplexed_model_id=model_id) if model_id else \
            self.engine.options(stream=True)
        pieces = handle.handle.remote(request)
        finished = False
        try:
            async for piece in pieces:
                yield piece
            finished = True
        except BackPressureError as exc:
            raise Backpressure(str(exc).splitlines()[0]) from exc
        except RayTaskError:  # our own code raised on the replica: the ingress answers 500, logged there
            raise
        except RayError as exc:  # the replica's process died, or Ray took it away
            raise ReplicaLost(LOST) from exc
        finally:
            if not finished:
                pieces.cancel()  # the client left (or the replica did): the replica frees the request's slot

    async def entries(self) -> list[CatalogEntry]:
        return await self.catalog.entries.remote()

    async def add(self, name: str, path: str, replace: bool, pinned: bool) -> CatalogEntry | AdminFailure:
        return await self.catalog.add.remote(name, path, replace, pinned)

    async def remove(self, name: str) -> AdminFailure | None:
        return await self.catalog.remove.remote(name)

    async def base_card(self) -> BaseCard:
        return await self.engine.base_card.remote()

    async def replicas(self) -> list[ReplicaInfo]:
        answers = await self.engine.broadcast("describe").results_async(timeout_s=DESCRIBE_TIMEOUT_S,
                                                                        return_exceptions=True)
        return [a for a in answers if isinstance(a, ReplicaInfo)]  # a replica dying meanwhile is left out


class Ingress:
    def __init__(self, config: ServerConfig, engine: DeploymentHandle, catalog: DeploymentHandle) -> None:
        self.config = config
        self.cluster = HandleCluster(engine, catalog)

    def __serve_build_asgi_app__(self) -> FastAPI:
        return create_router_app(self.config, self.cluster)

    async def startup_report(self) -> list[str]:
        """For the CLI: the --adapter (and restored) adapters that failed validation on a replica."""
        return await self.cluster.catalog.startup_report.remote()
