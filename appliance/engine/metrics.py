"""Prometheus metrics.

Counters and the histogram live for the whole process (the worker reports to
them through `images_generated` and `images_failed`). Gauges that describe the
running engine (queue depth, worker heartbeat, GPU memory) are read at scrape
time by an `EngineCollector` in a registry of the app's own, so several apps in
one process (the tests) never clash over metric names.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from appliance.engine.engine import Engine

IMAGES_GENERATED = Counter("appliance_images_generated_total", "Images generated and saved.")
IMAGES_FAILED = Counter("appliance_images_failed_total",
                        "Images that failed to generate (and were refunded).")
GENERATION_SECONDS = Histogram(
    "appliance_generation_seconds",
    "Wall time of one pipeline call, which makes a batch of images.",
    # From a fast GPU's small batch to a CPU's large one.
    buckets=(0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300, 600),
)


def images_generated(count: int, seconds: float) -> None:
    IMAGES_GENERATED.inc(count)
    GENERATION_SECONDS.observe(seconds)


def images_failed(count: int) -> None:
    IMAGES_FAILED.inc(count)


def _gpu_memory() -> Iterator[tuple[str, str, float]]:
    """(device, kind, bytes) for each CUDA device this process already uses."""
    torch = sys.modules.get("torch")
    # Only where torch already runs CUDA: a scrape must never create a context.
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return
    for index in range(torch.cuda.device_count()):
        device = f"cuda:{index}"
        yield device, "allocated", float(torch.cuda.memory_allocated(index))
        yield device, "reserved", float(torch.cuda.memory_reserved(index))
        free, total = torch.cuda.mem_get_info(index)
        yield device, "free", float(free)
        yield device, "total", float(total)


class EngineCollector(Collector):
    def __init__(self, engine: "Engine"):
        self.engine = engine

    def collect(self) -> Iterator[Metric]:
        engine = self.engine
        yield GaugeMetricFamily("appliance_queue_depth", "Images waiting in the queue.",
                                value=len(engine.queue))
        yield GaugeMetricFamily("appliance_engine_ready",
                                "1 once the model is loaded and the worker runs.",
                                value=1 if engine.ready else 0)
        yield GaugeMetricFamily("appliance_worker_heartbeat_age_seconds",
                                "Seconds since the stalest engine worker last came back to the queue.",
                                value=max(0.0, time.monotonic() - engine.heartbeat))
        memory = GaugeMetricFamily("appliance_gpu_memory_bytes",
                                   "GPU memory by device: allocated and reserved by torch,"
                                   " free and total on the device.",
                                   labels=["device", "kind"])
        for device, kind, value in _gpu_memory():
            memory.add_metric([device, kind], value)
        yield memory


def engine_registry(engine: "Engine") -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(EngineCollector(engine))
    return registry


def exposition(*registries: CollectorRegistry) -> bytes:
    """The process-wide metrics followed by the given registries', in text format."""
    return b"".join(generate_latest(registry) for registry in (REGISTRY, *registries))
