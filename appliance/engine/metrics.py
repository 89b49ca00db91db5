"""The engine's Prometheus metrics, in a registry each engine owns.

The workers count images through the EngineMetrics they are given; gauges of
the running engine (queue depth, readiness, worker heartbeat, GPU memory) are
read at scrape time from a status function. Nothing here imports the engine,
and several engines in one process (the tests) never clash over metric names.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from appliance.engine.gpu import memory_by_device


@dataclass(frozen=True)
class EngineStatus:
    queue_depth: int
    ready: bool
    heartbeat_age_seconds: float


class EngineMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self._generated = Counter("appliance_images_generated_total",
                                  "Images generated and saved.", registry=self.registry)
        self._failed = Counter("appliance_images_failed_total",
                               "Images that failed to generate (and were refunded).",
                               registry=self.registry)
        self._seconds = Histogram(
            "appliance_generation_seconds",
            "Wall time of one pipeline call, which makes a batch of images.",
            # From a fast GPU's small batch to a CPU's large one.
            buckets=(0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300, 600),
            registry=self.registry,
        )

    def images_generated(self, count: int, seconds: float) -> None:
        self._generated.inc(count)
        self._seconds.observe(seconds)

    def images_failed(self, count: int) -> None:
        self._failed.inc(count)

    def watch(self, status: Callable[[], EngineStatus]) -> None:
        """Adds the gauges, read from `status` at each scrape."""
        self.registry.register(_StatusCollector(status))


class _StatusCollector(Collector):
    def __init__(self, status: Callable[[], EngineStatus]):
        self.status = status

    def collect(self) -> Iterator[Metric]:
        status = self.status()
        yield GaugeMetricFamily("appliance_queue_depth", "Images waiting in the queue.",
                                value=status.queue_depth)
        yield GaugeMetricFamily("appliance_engine_ready",
                                "1 once the model is loaded and the worker runs.",
                                value=1 if status.ready else 0)
        yield GaugeMetricFamily("appliance_worker_heartbeat_age_seconds",
                                "Seconds since the stalest engine worker last came back to the"
                                " queue.", value=status.heartbeat_age_seconds)
        memory = GaugeMetricFamily("appliance_gpu_memory_bytes",
                                   "GPU memory by device: allocated and reserved by torch,"
                                   " free and total on the device.",
                                   labels=["device", "kind"])
        for device, kind, value in memory_by_device():
            memory.add_metric([device, kind], value)
        yield memory


def exposition(*registries: CollectorRegistry) -> bytes:
    """The process-wide metrics (HTTP requests) followed by the given registries', as text."""
    return b"".join(generate_latest(registry) for registry in (REGISTRY, *registries))
