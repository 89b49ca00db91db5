"""The engine's Prometheus metrics, in a registry each engine owns.

The workers count images through the EngineMetrics they are given; gauges of
the running engine (queue depth, readiness, worker heartbeat, GPU memory) are
read at scrape time from a status function. Nothing here imports the engine,
and several engines in one process (the tests) never clash over metric names.

The console's system page also wants the images made per minute over the last
hour, which a Prometheus counter cannot answer by itself: ImageRate keeps them
in memory, so they start again from zero when the service restarts.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from appliance.jobs.models import GenerationSettings

# (device, kind, bytes), as gpu.memory_by_device yields them.
MemoryFigure = tuple[str, str, float]


@dataclass(frozen=True)
class WorkerStatus:
    name: str
    device: str
    ready: bool
    alive: bool
    max_batch_size: int
    batches_in_flight: int
    # The newest batch started and not yet ended; None while the worker is idle.
    batch_size: int | None = None
    batch_settings: GenerationSettings | None = None
    # The models it holds, as (name, bytes), least recently used first, and the
    # budget they share (None before its first load).
    models: tuple[tuple[str, int], ...] = ()
    model_budget_bytes: int | None = None

    @property
    def busy(self) -> bool:
        return self.batches_in_flight > 0


@dataclass(frozen=True)
class EngineStatus:
    queue_depth: int
    ready: bool
    heartbeat_age_seconds: float
    workers: tuple[WorkerStatus, ...] = ()
    # Account id -> images it has waiting in the queue.
    queue_by_account: dict[int, int] = field(default_factory=dict)
    # Images made in each of the last 60 minutes, oldest first (see ImageRate).
    images_per_minute: tuple[int, ...] = ()
    # Empty where no CUDA device is in use.
    gpu_memory: tuple[MemoryFigure, ...] = ()

    @property
    def images_last_minute(self) -> int:
        return self.images_per_minute[-1] if self.images_per_minute else 0

    @property
    def images_last_hour(self) -> int:
        return sum(self.images_per_minute)

    def holders(self) -> dict[str, list[str]]:
        """Model name -> the workers that hold it now."""
        held_by: dict[str, list[str]] = {}
        for worker in self.workers:
            for name, _ in worker.models:
                held_by.setdefault(name, []).append(worker.name)
        return held_by


class ImageRate:
    """Images made in each second of the last hour, in a ring of one slot a second.

    Memory only, a fixed 3,600 slots: a slot older than an hour is reused. Read
    as per-minute totals, the newest of which covers exactly the last 60 seconds.
    """

    SECONDS = 3600
    MINUTE = 60

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._counts = [0] * self.SECONDS
        self._stamps = [-1] * self.SECONDS  # the whole second each slot counts
        self._lock = threading.Lock()

    def add(self, count: int) -> None:
        second = int(self._clock())
        slot = second % self.SECONDS
        with self._lock:
            if self._stamps[slot] != second:
                self._stamps[slot], self._counts[slot] = second, 0
            self._counts[slot] += count

    def per_minute(self) -> tuple[int, ...]:
        """Images made in each of the last 60 minutes, oldest first."""
        now = int(self._clock())
        minutes = [0] * (self.SECONDS // self.MINUTE)
        with self._lock:
            for stamp, count in zip(self._stamps, self._counts, strict=True):
                age = now - stamp
                if stamp >= 0 and 0 <= age < self.SECONDS:
                    minutes[-1 - age // self.MINUTE] += count
        return tuple(minutes)


class EngineMetrics:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = ImageRate(clock)
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
        self.rate.add(count)

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
        for device, kind, value in status.gpu_memory:
            memory.add_metric([device, kind], value)
        yield memory
        loaded = GaugeMetricFamily("appliance_model_loaded_bytes",
                                   "Models each worker holds on its device, by their weights'"
                                   " bytes (no series: not loaded there).",
                                   labels=["worker", "device", "model"])
        budget = GaugeMetricFamily("appliance_model_budget_bytes",
                                   "Memory each worker's loaded models may take together"
                                   " (engine.gpu_memory_budget).", labels=["worker", "device"])
        for worker in status.workers:
            for model, size in worker.models:
                loaded.add_metric([worker.name, worker.device, model], size)
            if worker.model_budget_bytes is not None:
                budget.add_metric([worker.name, worker.device], worker.model_budget_bytes)
        yield loaded
        yield budget


def exposition(*registries: CollectorRegistry) -> bytes:
    """The process-wide metrics (HTTP requests) followed by the given registries', as text."""
    return b"".join(generate_latest(registry) for registry in (REGISTRY, *registries))
