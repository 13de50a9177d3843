"""Each engine replica's Prometheus endpoint: the single server's metrics (its app's registry) with a `replica`
label on every sample, on a port of its own, plus what this replica holds of the catalog.

Why a port per replica rather than the ingress's /metrics: a request to the ingress reaches one replica of
Ray's choosing, and the same metric families from several replicas cannot be concatenated into one valid
exposition. Prometheus scrapes each replica instead, and finds them at the ingress's GET /metrics/targets
(its HTTP service-discovery format). The port: --metrics-port + the replica's local rank on its node, so a
replica Ray restarts comes back on the same port; a taken port falls back to a free one (still listed).
"""

from __future__ import annotations

import logging
from typing import Callable, Iterator
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from server.ray.replica_adapters import ReplicaAdapters

log = logging.getLogger(__name__)


class LabelledCollector(Collector):
    """Every family of `source`, each sample with `labels` added."""

    def __init__(self, source: CollectorRegistry, labels: dict[str, str]) -> None:
        self.source = source
        self.labels = labels

    def collect(self) -> Iterator[Metric]:
        for family in self.source.collect():
            copy = Metric(family.name, family.documentation, family.type, family.unit)
            copy.samples = [sample._replace(labels={**sample.labels, **self.labels}) for sample in family.samples]
            yield copy


class ReplicaCollector(Collector):
    """Which adapters this replica has read and holds (what the affinity of Ray's routing is read from), and
    the replica itself (its pid: what to look at on its node). `label` bounds adapter names as Metrics does."""

    def __init__(self, adapters: ReplicaAdapters, label: Callable[[str], str], info: dict[str, str]) -> None:
        self.adapters = adapters
        self.label = label
        self.info = info

    def collect(self) -> Iterator[Metric]:
        info = GaugeMetricFamily("loraplex_replica_info", "This engine replica (always 1)", labels=list(self.info))
        info.add_metric(list(self.info.values()), 1)
        yield info
        loads = CounterMetricFamily("loraplex_replica_adapter_loads", "Adapter folders this replica read, by adapter "
                                    "(first use, or a newer version)", labels=["adapter"])
        for name, count in sorted(self.adapters.loads.items()):
            loads.add_metric([self.label(name)], count)
        yield loads
        held = GaugeMetricFamily("loraplex_replica_adapters_held", "Adapters this replica holds (memory or its "
                                 "disk tier), by adapter", labels=["adapter"])
        for name in sorted(self.adapters.held):
            held.add_metric([self.label(name)], 1)
        yield held


def serve_metrics(source: CollectorRegistry, labels: dict[str, str], host: str, port: int) -> WSGIServer:
    """Start the endpoint (a daemon thread); `port` taken: a free one instead, logged."""
    collector = LabelledCollector(source, labels)
    try:
        server, _ = start_http_server(port, addr=host, registry=collector)
    except OSError as exc:
        if not port:
            raise
        log.warning("metrics port %d is taken (%s); this replica's metrics are on a free port instead", port, exc)
        server, _ = start_http_server(0, addr=host, registry=collector)
    log.info("replica metrics on http://%s:%d/metrics", host, server.server_port)
    return server
