"""The engine deployment: each Ray Serve replica is one Replica (replica.py: the single server's app and its
share of the catalog), plus what Ray adds: model multiplexing, a metrics port, the health check.

Ray's multiplexing (`serve.multiplexed`, its budget `max_models_per_replica`: the replica's memory tier)
records per request that this replica holds the request's `model`, so Ray sends that model's next requests
here; when its LRU lets a model go, ReplicaAdapters retires the adapters no other multiplexed model names.
The catalog calls `validate` (on one replica) and `retire` (broadcast to every one); the ingress calls
`describe` (broadcast: /metrics/targets) and `base_card`.
"""

from __future__ import annotations

import logging
import os

import ray
import torch
from ray import serve

from server.config import ServerConfig
from server.ray.replica import Replica
from server.ray.replica_metrics import ReplicaCollector, serve_metrics
from server.ray.routing import adapter_names
from server.ray.wire import AdminFailure, BaseCard, ForwardedRequest, ReplicaInfo, StagedAdapter, Validated

log = logging.getLogger(__name__)

ANY_HOST = ("", "0.0.0.0", "::")


class EngineReplica:
    async def __init__(self, config: ServerConfig, max_models: int, threads: int, metrics_port: int) -> None:
        """`config`: the user's ServerConfig; `max_models`: Ray's multiplexing budget; `threads`: the model
        workers' torch threads; `metrics_port`: first port of the replicas' metrics endpoints (0: a free one)."""
        torch.set_num_threads(1)  # this thread loads the base; the workers get `threads` (server/cli.py says why)
        context = serve.get_replica_context()
        self.rank = context.rank.local_rank
        self.replica = await Replica.start(config, threads, context.replica_tag)
        state = self.replica.state
        info = {"replica": self.replica.name, "rank": str(self.rank), "pid": str(os.getpid())}
        state.metrics.registry.register(ReplicaCollector(self.replica.adapters, state.metrics.adapter_label, info))
        wanted = metrics_port + self.rank if metrics_port else 0
        self.metrics_host = config.host
        self._metrics = serve_metrics(state.metrics.registry, {"replica": self.replica.name}, config.host, wanted)
        served, adapters = state.served_name, self.replica.adapters

        async def load(model_id: str):
            return adapters.token(model_id, adapter_names(model_id, served))

        self._multiplexed = serve.multiplexed(max_num_models_per_replica=max_models)(load)
        log.info("engine replica %s (rank %d) serving %s", self.replica.name, self.rank, served)

    async def handle(self, request: ForwardedRequest):
        """The app's answer to `request`: a ResponseStart, then body bytes."""
        async for piece in self.replica.handle(request, serve.get_multiplexed_model_id(), self._multiplexed):
            yield piece

    async def validate(self, staged: StagedAdapter) -> Validated | AdminFailure:
        return await self.replica.validate(staged)

    async def retire(self, name: str, below: int | None) -> str:
        return await self.replica.retire(name, below)

    async def describe(self) -> ReplicaInfo:
        node = ray.util.get_node_ip_address()
        host = node if self.metrics_host in ANY_HOST else self.metrics_host
        return ReplicaInfo(self.replica.name, self.rank, node, host, self._metrics.server_port, os.getpid())

    async def base_card(self) -> BaseCard:
        return self.replica.base_card()

    def check_health(self) -> None:
        """Ray's health check: a dead model worker thread makes the replica unhealthy, and Ray replaces it."""
        self.replica.check_health()

    async def __del__(self) -> None:
        """Ray's graceful shutdown, after the replica's requests drained: free the port, stop the workers."""
        self._metrics.shutdown()
        await self.replica.stop()
