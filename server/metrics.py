"""Prometheus metrics, on a registry owned by the app (no process-global collectors).

The `adapter` label has bounded cardinality: names beyond MAX_ADAPTER_LABELS distinct values are
reported as "__other__", so a tenant-per-adapter deployment cannot blow up the time series count.
"""

from __future__ import annotations

import threading

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

MAX_ADAPTER_LABELS = 100
OTHER_ADAPTER = "__other__"
NO_ADAPTER = "__base__"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._labels: set[str] = set()
        self._lock = threading.Lock()
        r = self.registry
        self.requests = Counter(
            "loraplex_requests", "HTTP requests by route, status and adapter", ["route", "status", "adapter"], registry=r
        )
        self.request_latency = Histogram(
            "loraplex_request_latency_seconds", "End-to-end request latency", ["route", "adapter"],
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.time_to_first_token = Histogram(
            "loraplex_time_to_first_token_seconds", "Time from request to first generated token", ["adapter"],
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.prompt_tokens = Counter("loraplex_prompt_tokens", "Prompt tokens processed", ["adapter"], registry=r)
        self.generation_tokens = Counter("loraplex_generation_tokens", "Tokens generated", ["adapter"], registry=r)
        self.classified_inputs = Counter("loraplex_classified_inputs", "Texts classified", ["adapter"], registry=r)
        self.adapters_loaded = Gauge("loraplex_adapters_loaded", "Adapters ready to serve", registry=r)
        self.adapter_loads = Counter(
            "loraplex_adapter_loads", "Adapter load attempts by result", ["result"], registry=r
        )
        self.adapter_load_latency = Histogram(
            "loraplex_adapter_load_seconds", "Time to read, validate and load an adapter",
            buckets=LATENCY_BUCKETS, registry=r,
        )

    def adapter_label(self, name: str | None) -> str:
        """The label value for an adapter name, bounded to MAX_ADAPTER_LABELS distinct values."""
        if not name:
            return NO_ADAPTER
        with self._lock:
            if name in self._labels:
                return name
            if len(self._labels) < MAX_ADAPTER_LABELS:
                self._labels.add(name)
                return name
        return OTHER_ADAPTER
