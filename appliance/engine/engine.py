"""The engine: the queue, a worker per device that owns its pipeline, the PNG writers."""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import partial

import torch

from appliance.core.config import Config
from appliance.core.database import ConnectionPool
from appliance.engine.queue import ImageQueue
from appliance.engine.worker import ImageGenerator, Worker
from appliance.engine.writer import ImageWriter
from appliance.jobs.store import unfinished_images

log = logging.getLogger(__name__)

# How long stop() waits for each worker to finish the batch it is generating.
STOP_TIMEOUT_SECONDS = 30.0


def worker_devices(config: Config) -> list[str]:
    """One entry per worker: engine.devices, or model.device when that is empty."""
    devices = config.engine.devices
    if devices == "all":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count:
            return [f"cuda:{index}" for index in range(count)]
        log.warning("engine.devices is \"all\" but there is no CUDA GPU: one worker on the CPU")
        return ["cpu"]
    return list(devices) or [config.model.device]


class Engine:
    def __init__(self, config: Config, database: ConnectionPool,
                 load_generator: Callable[[], ImageGenerator] | None = None):
        """`load_generator` replaces the diffusers pipeline (tests); it is called once per worker."""
        self.config = config
        self.database = database
        engine = config.engine
        self.queue = ImageQueue(engine.queue_capacity)
        self.devices = worker_devices(config)
        self.writer = ImageWriter(config.images_dir, engine.png_threads, engine.png_compress_level)
        if load_generator is None:
            from appliance.engine.diffusers_generator import load_configured_generator

            loaders = [partial(load_configured_generator, config, device) for device in self.devices]
        else:
            loaders = [load_generator] * len(self.devices)
        several = len(self.devices) > 1
        self.workers = [
            Worker(database, self.queue, loader, self.writer, engine.batch_size,
                   engine.batch_window_seconds,
                   name=f"engine-worker-{device}" if several else "engine-worker")
            for device, loader in zip(self.devices, loaders)
        ]

    @property
    def worker(self) -> Worker:
        """The first worker (the only one on a single device)."""
        return self.workers[0]

    def start(self) -> None:
        recovered = unfinished_images(self.database.db())
        if recovered:
            log.info("re-queued %d images left unfinished when the service last stopped",
                     len(recovered))
        self.queue.put_recovered(recovered)
        for worker in self.workers:
            worker.start()

    def stop(self) -> None:
        for worker in self.workers:
            worker.signal_stop()
        for worker in self.workers:
            worker.join(STOP_TIMEOUT_SECONDS)
        # Batches already generated are saved and recorded before the database closes.
        self.writer.close()
        _log_peak_gpu_memory()

    @property
    def ready(self) -> bool:
        """Every worker has its model loaded and warmed up, and runs."""
        return all(w.ready.is_set() and w.is_alive() for w in self.workers)

    @property
    def load_error(self) -> BaseException | None:
        return next((w.load_error for w in self.workers if w.load_error), None)

    @property
    def heartbeat(self) -> float:
        """The stalest worker's heartbeat (time.monotonic)."""
        return min(w.heartbeat for w in self.workers)


def _log_peak_gpu_memory() -> None:
    # Only where this process already uses CUDA: asking would otherwise start it.
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return
    gib = 2**30
    for index in range(torch.cuda.device_count()):
        if torch.cuda.max_memory_allocated(index):
            log.info("peak GPU memory on cuda:%d: %.2f GiB allocated, %.2f GiB reserved", index,
                     torch.cuda.max_memory_allocated(index) / gib,
                     torch.cuda.max_memory_reserved(index) / gib)
