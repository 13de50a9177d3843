"""The ingress app on an in-process cluster: the real catalog, replicas and router app, without Ray.

LocalCluster is router_app's Cluster and the catalog's EngineControl over Replica objects in this process;
Ray's multiplexed routing is stood in for by `route` (sticky per model, first use on the replica holding the
fewest models, as Ray's router prefers), and a test may pin requests to a replica with `pin`.
"""

from __future__ import annotations

import contextlib
import threading
import time
from pathlib import Path
from typing import AsyncIterator

import pytest
import uvicorn

from loadtest.serve import free_port
from server.adapter_limits import AdapterLimits
from server.config import ServerConfig
from server.persist import RuntimeAdapters
from server.ray.catalog import AdapterCatalog
from server.ray.replica import Replica
from server.ray.router_app import create_router_app
from server.ray.wire import BaseCard, ForwardedRequest, ReplicaInfo, ResponseStart, StagedAdapter

ADMIN_TOKEN = "test-token"
STARTUP_WAIT_S = 60


class LocalCluster:
    def __init__(self, config: ServerConfig, replicas: int, journal: Path | None = None) -> None:
        self.config, self.count, self.journal = config, replicas, journal
        self.members: list[Replica] = []
        self.routes: dict[str, int] = {}
        self.pin: int | None = None  # send every request to this replica
        self.catalog: AdapterCatalog | None = None
        self.startup_failures: list[str] = []

    async def start(self) -> None:
        self.members = [await Replica.start(self.config, 1, f"r{i}") for i in range(self.count)]
        limits = AdapterLimits(roots=tuple(self.config.adapter_roots) or None, max_bytes=self.config.max_adapter_bytes,
                               max_rank=self.config.max_lora_rank)
        persist = RuntimeAdapters(self.journal, "test") if self.journal is not None else None
        self.catalog = AdapterCatalog(self, limits, self.config.max_adapters, persist, self.config.adapters)
        self.startup_failures = await self.catalog.check_startup()

    async def stop(self) -> None:
        for replica in self.members:
            await replica.stop()

    def route(self, model_id: str) -> int:
        if self.pin is not None:
            return self.pin
        if not model_id:
            return 0
        if model_id not in self.routes:
            load = [list(self.routes.values()).count(i) for i in range(self.count)]
            self.routes[model_id] = load.index(min(load))
        return self.routes[model_id]

    # -- EngineControl -----------------------------------------------------------------------------

    async def validate(self, staged: StagedAdapter):
        return await self.members[0].validate(staged)

    async def retire(self, name: str, below: int | None) -> None:
        for replica in self.members:
            await replica.retire(name, below)

    # -- Cluster -----------------------------------------------------------------------------------

    async def resolve(self, names):
        return self.catalog.resolve(names)

    async def forward(self, request: ForwardedRequest, model_id: str) -> AsyncIterator[ResponseStart | bytes]:
        async for piece in self.members[self.route(model_id)].handle(request, model_id):
            yield piece

    async def entries(self):
        return self.catalog.entries()

    async def add(self, name, path, replace, pinned):
        return await self.catalog.add(name, path, replace=replace, pinned=pinned)

    async def remove(self, name):
        return await self.catalog.remove(name)

    async def base_card(self) -> BaseCard:
        return self.members[0].base_card()

    async def replicas(self) -> list[ReplicaInfo]:
        return [ReplicaInfo(r.name, i, "127.0.0.1", "127.0.0.1", 9600 + i, 0) for i, r in enumerate(self.members)]


def local_ingress(config: ServerConfig, cluster: LocalCluster):
    """The ingress app whose lifespan starts and stops `cluster`."""
    app = create_router_app(config, cluster)

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        await cluster.start()
        yield
        await cluster.stop()

    app.router.lifespan_context = lifespan
    return app


@contextlib.contextmanager
def serving(app) -> "str":
    """`app` on uvicorn in a thread, on loopback; yields its URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + STARTUP_WAIT_S
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=STARTUP_WAIT_S)


@pytest.fixture
def tiny_config(tmp_path, tiny_llama_dir, tiny_adapters) -> ServerConfig:
    return ServerConfig(base=str(tiny_llama_dir), served_name="tiny", adapters={"alpha": str(tiny_adapters["alpha"])},
                        state_dir=tmp_path / "state", admin_token=ADMIN_TOKEN, max_model_len=256, max_tokens_limit=64,
                        adapter_roots=[tmp_path.parent], port=0, log_level="warning")
