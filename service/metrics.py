"""Prometheus metrics of the service, on a registry of its own; the `task` label is bounded."""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Iterator

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from service.batcher import BatchObserver, Row

__all__ = ["CONTENT_TYPE_LATEST", "OTHER", "DeviceMemory", "Metrics", "MetricsObserver"]

OTHER = "other"
_P = "adapterserve_"

# `*_created` series double the exposition and no dashboard of ours reads them.
disable_created_metrics()
_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_ROWS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class Metrics:
    """Every metric of DESIGN section 4, plus a few operational gauges."""

    def __init__(self, *, max_tasks: int) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._max_tasks = max_tasks
        self._labelled: set[str] = set()
        self._lock = threading.Lock()
        r = self.registry
        self.requests = Counter(
            _P + "requests", "Predict requests by task and HTTP status.", ["task", "status"], registry=r
        )
        self.request_duration = Histogram(
            _P + "request_duration_seconds",
            "Predict latency by task.",
            ["task"],
            buckets=_LATENCY,
            registry=r,
        )
        self.requests_in_flight = Gauge(
            _P + "requests_in_flight", "Predict requests being served.", registry=r
        )
        self.queue_wait = Histogram(
            _P + "queue_wait_seconds", "Time rows wait in the queue.", buckets=_LATENCY, registry=r
        )
        self.forward_duration = Histogram(
            _P + "forward_duration_seconds", "Duration of one forward pass.", buckets=_LATENCY, registry=r
        )
        self.batch_size = Histogram(_P + "batch_size", "Rows per forward pass.", buckets=_ROWS, registry=r)
        self.batch_tasks = Histogram(
            _P + "batch_tasks", "Distinct tasks per forward pass.", buckets=_ROWS, registry=r
        )
        self.queue_depth = Gauge(_P + "queue_depth", "Rows waiting in the queue.", registry=r)
        self.rejected = Counter(
            _P + "rejected", "Requests refused or dropped, by reason.", ["reason"], registry=r
        )
        self.adapter_loads = Counter(
            _P + "adapter_loads",
            "Adapter loads by source and result: store (read and decoded into host memory) or "
            "hypernetwork (generated into a device slot).",
            ["source", "result"],
            registry=r,
        )
        self.adapter_load_duration = Histogram(
            _P + "adapter_load_duration_seconds",
            "Time to read and decode an adapter (store), or to generate it into a slot (hypernetwork).",
            ["source"],
            buckets=_LATENCY,
            registry=r,
        )
        self.cache_hits = Counter(_P + "adapter_cache_hits", "Device slot lookups that hit.", registry=r)
        self.cache_misses = Counter(
            _P + "adapter_cache_misses", "Device slot lookups that missed.", registry=r
        )
        self.evictions = Counter(_P + "adapter_evictions", "Adapters evicted from device slots.", registry=r)
        self.resident = Gauge(_P + "adapters_resident", "Adapters resident in device slots.", registry=r)
        self.cache_bytes = Gauge(_P + "adapter_cache_bytes", "Bytes of adapters in device slots.", registry=r)
        self.host_cache_bytes = Gauge(
            _P + "adapter_host_cache_bytes", "Bytes of decoded adapters in host memory.", registry=r
        )
        # Per tier (device: adapters in bank rows; host: decoded adapters in memory), one family each.
        self.tier_hits = Counter(
            _P + "tier_hits", "Lookups that found the adapter, by tier.", ["tier"], registry=r
        )
        self.tier_misses = Counter(
            _P + "tier_misses", "Lookups that had to load the adapter, by tier.", ["tier"], registry=r
        )
        self.tier_loads = Counter(
            _P + "tier_loads", "Adapters loaded into a tier, by tier.", ["tier"], registry=r
        )
        self.tier_evictions = Counter(
            _P + "tier_evictions", "Adapters evicted from a tier to make room, by tier.", ["tier"], registry=r
        )
        self.tier_bytes = Gauge(
            _P + "tier_bytes", "Bytes of adapters resident, by tier.", ["tier"], registry=r
        )
        self.tier_budget_bytes = Gauge(
            _P + "tier_budget_bytes", "Byte budget, by tier.", ["tier"], registry=r
        )
        self.tier_adapters = Gauge(_P + "tier_adapters", "Adapters resident, by tier.", ["tier"], registry=r)
        self.pool_bytes = Gauge(
            _P + "device_pool_bytes",
            "Bytes the device banks have allocated (resident rows plus free and not yet compacted ones).",
            registry=r,
        )
        self.tokens = Counter(_P + "tokens", "Input tokens processed, by task.", ["task"], registry=r)
        self.generated_tokens = Counter(
            _P + "generated_tokens", "Tokens generated, by task.", ["task"], registry=r
        )
        self.time_to_first_token = Histogram(
            _P + "time_to_first_token_seconds",
            "From a generation's admission to its first token.",
            buckets=_LATENCY,
            registry=r,
        )
        self.time_per_output_token = Histogram(
            _P + "time_per_output_token_seconds",
            "Mean time between a generation's tokens after the first.",
            buckets=_LATENCY,
            registry=r,
        )
        self.generation_rows = Gauge(_P + "generation_rows", "Rows decoding now.", registry=r)
        self.uploads = Counter(_P + "uploads", "Adapter uploads by result.", ["result"], registry=r)
        self.ready = Gauge(_P + "ready", "1 when the service takes traffic, else 0.", registry=r)
        r.register(DeviceMemory())

    def task_label(self, task: str, *, registered: bool) -> str:
        """The label value for a task: itself while under the cap and registered, else `other`."""
        if not registered:
            return OTHER
        with self._lock:
            if task in self._labelled:
                return task
            if len(self._labelled) < self._max_tasks:
                self._labelled.add(task)
                return task
        return OTHER

    def render(self) -> bytes:
        """The text exposition of every metric."""
        return generate_latest(self.registry)


class DeviceMemory:
    """`device_memory_bytes{device,kind}`, read at scrape time: the host (the process's resident set
    and the machine's total) and every CUDA device torch has initialised (allocated, reserved, total).
    """

    name = _P + "device_memory_bytes"

    def describe(self) -> list[GaugeMetricFamily]:
        """The family without samples, so registering it reads no device."""
        return [self._family()]

    def _family(self) -> GaugeMetricFamily:
        return GaugeMetricFamily(
            self.name,
            "Memory of the devices the process uses, by device and kind.",
            labels=["device", "kind"],
        )

    def collect(self) -> Iterator[GaugeMetricFamily]:
        """One sample per device and kind."""
        family = self._family()
        page = os.sysconf("SC_PAGE_SIZE")
        try:
            with open("/proc/self/statm") as f:
                family.add_metric(["cpu", "resident"], int(f.read().split()[1]) * page)
        except OSError:  # not Linux: no resident-set figure
            pass
        family.add_metric(["cpu", "total"], os.sysconf("SC_PHYS_PAGES") * page)
        # never import torch (or initialise CUDA) just to report on it
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_initialized():
            for i in range(torch.cuda.device_count()):
                device = f"cuda:{i}"
                family.add_metric([device, "allocated"], torch.cuda.memory_allocated(i))
                family.add_metric([device, "reserved"], torch.cuda.memory_reserved(i))
                family.add_metric([device, "total"], torch.cuda.mem_get_info(i)[1])
        yield family


class MetricsObserver(BatchObserver):
    """Feeds the batcher's hooks into the metrics."""

    def __init__(self, metrics: Metrics) -> None:
        self.m = metrics

    def on_batch(self, rows: list[Row], queue_waits: list[float]) -> None:
        """Record queue waits of a formed batch."""
        for wait in queue_waits:
            self.m.queue_wait.observe(max(wait, 0.0))

    def on_reject(self, reason: str) -> None:
        """Count a refused or dropped request."""
        self.m.rejected.labels(reason=reason).inc()

    def on_queue_depth(self, depth: int) -> None:
        """Track the queue's depth."""
        self.m.queue_depth.set(depth)
