"""Prometheus metrics, on a registry owned by the app (no process-global collectors).

The `adapter` label has bounded cardinality: names beyond MAX_ADAPTER_LABELS distinct values are
reported as "__other__", so a tenant-per-adapter deployment cannot blow up the time series count.
"""

from __future__ import annotations

import threading

from typing import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

MAX_ADAPTER_LABELS = 100
OTHER_ADAPTER = "__other__"
NO_ADAPTER = "__base__"
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
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
        self.embedded_inputs = Counter("loraplex_embedded_inputs", "Inputs embedded", ["adapter"], registry=r)
        self.inter_token_latency = Histogram(
            "loraplex_inter_token_latency_seconds", "Time between consecutive generated tokens", ["adapter"],
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.e2e_latency = Histogram(
            "loraplex_e2e_request_latency_seconds", "Generation request latency, submit to last token", ["adapter"],
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.queue_time = Histogram(
            "loraplex_request_queue_time_seconds", "Time a request waited before admission", ["adapter"],
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.batch_size = Histogram("loraplex_batch_size", "Sequences per batched forward", ["phase"],
                                    buckets=BATCH_BUCKETS, registry=r)
        self.step_latency = Histogram("loraplex_step_latency_seconds", "Time of one batched forward", ["phase"],
                                      buckets=LATENCY_BUCKETS, registry=r)
        self.adapters_loaded = Gauge("loraplex_adapters_loaded", "Adapters ready to serve", registry=r)
        self.adapter_loads = Counter(
            "loraplex_adapter_loads", "Adapter load attempts by result", ["result"], registry=r
        )
        self.adapter_load_latency = Histogram(
            "loraplex_adapter_load_seconds", "Time to read, validate and load an adapter",
            buckets=LATENCY_BUCKETS, registry=r,
        )

    def observe_adapter_load(self, result: str, seconds: float) -> None:
        """Registry hook after every adapter folder read: result ok (added), reload (re-read after an
        eviction from memory) or error."""
        self.adapter_loads.labels(result).inc()
        if result != "error":
            self.adapter_load_latency.observe(seconds)

    def observe_step(self, phase: str, batch_size: int, seconds: float) -> None:
        """Scheduler hook, once per batched forward."""
        self.batch_size.labels(phase).observe(batch_size)
        self.step_latency.labels(phase).observe(seconds)

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


class EngineCollector(Collector):
    """Reads the engine's own counters at scrape time (the scheduler and the LoRA slots keep them)."""

    def __init__(self, read: Callable[[], dict[str, float]]) -> None:
        self.read = read

    def collect(self) -> Iterator:
        values = self.read()
        gauges = {
            "loraplex_num_requests_running": "Requests in the running batch",
            "loraplex_num_requests_waiting": "Requests waiting for admission",
            "loraplex_kv_cache_usage_perc": "Fraction of the KV cache's token capacity in use",
            "loraplex_lora_slots_used": "Adapters resident in device LoRA slots",
            "loraplex_adapters_resident": "Adapters loaded in memory (the rest are on disk until used)",
            "loraplex_onnx_sessions_open": "ONNX sessions open (onnxruntime backend)",
            "loraplex_base_weight_bytes": "Bytes of the base model's weights as held (quantized ones as stored)",
        }
        counters = {
            "loraplex_lora_slot_hits": "Batches whose adapter was already in a device slot",
            "loraplex_lora_slot_loads": "Adapters copied into a device slot (slot misses)",
            "loraplex_lora_slot_evictions": "Adapters evicted from a device slot (least recently used)",
            "loraplex_adapter_cache_hits": "Requests whose adapter was in memory",
            "loraplex_adapter_cache_misses": "Requests whose adapter was re-read from disk",
            "loraplex_adapter_cache_evictions": "Adapters dropped from memory (least recently used, not held)",
            "loraplex_onnx_session_loads": "ONNX sessions opened (onnxruntime backend: first use, or after an eviction)",
        }
        for name, help_text in gauges.items():
            if name in values:
                yield GaugeMetricFamily(name, help_text, value=values[name])
        for name, help_text in counters.items():
            if name in values:
                yield CounterMetricFamily(name, help_text, value=values[name])
