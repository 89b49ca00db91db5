"""The engine: the queue, a worker per device that owns its pipeline, the PNG writers.

torch is imported only by the diffusers generator, when a worker loads its
model, and by gpu.py when asked about CUDA: the rest imports without it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from functools import partial

from appliance.core.config import Config, memory_budget_bytes
from appliance.core.database import ConnectionPool
from appliance.core.devices import ALL, resolve_devices
from appliance.engine import gpu
from appliance.engine.cluster import ClusterCollector, ClusterMember
from appliance.engine.loaded_models import LoadedModels, weights_on_disk
from appliance.engine.metrics import EngineMetrics, EngineStatus, WorkerStatus
from appliance.engine.queue import ImageQueue
from appliance.engine.worker import ImageGenerator, Worker
from appliance.engine.writer import ImageWriter
from appliance.jobs.catalog import Catalog
from appliance.jobs.store import unfinished_images

log = logging.getLogger(__name__)

# How long stopping waits for each worker's batch in progress; one still
# running after that is left to die with the process (its images stay
# running in the database and are made again after the restart).
STOP_TIMEOUT_SECONDS = 30.0


def worker_devices(config: Config) -> list[str]:
    """One entry per worker: engine.devices, or model.device when that is empty."""
    devices = config.engine.devices
    count = len(gpu.cuda_devices()) if devices == ALL else 0
    if devices == ALL and not count:
        log.warning("engine.devices is \"all\" but there is no CUDA GPU: one worker on the CPU")
    return resolve_devices(devices, config.model.device, count)


class Engine:
    def __init__(self, config: Config, database: ConnectionPool,
                 load_generator: Callable[[], ImageGenerator] | None = None,
                 catalog: Catalog | None = None,
                 load_model: Callable[[str], ImageGenerator] | None = None):
        """`load_generator` replaces the diffusers pipeline with one generator for every
        model (tests), `load_model(name)` with one per model; either is called on each
        worker's thread whenever it loads a model."""
        self.config = config
        self.database = database
        self.catalog = catalog or Catalog(config)
        engine = config.engine
        self.queue = ImageQueue(engine.queue_capacity)
        self.devices = worker_devices(config)
        self.metrics = EngineMetrics()
        self.metrics.watch(self.status)
        self.writer = ImageWriter(config.images_dir, engine.png_threads, engine.png_compress_level)
        several = len(self.devices) > 1
        self.workers = [
            Worker(database, self.queue, self._loaded_models(device, load_generator, load_model),
                   self.writer, self.metrics, engine.batch_size, engine.batch_window_seconds,
                   name=f"engine-worker-{device}" if several else "engine-worker",
                   default_model=self.catalog.default_name,
                   swap_after=engine.model_swap_seconds, load_failed=self.catalog.mark_broken,
                   node=config.node_name)
            for device in self.devices
        ]
        # Cluster mode: the node's queue is stocked from the shared one (engine/cluster.py).
        self.cluster = (ClusterMember(config, database, self.queue, self.devices)
                        if config.cluster_mode else None)
        if self.cluster is not None:
            self.metrics.registry.register(ClusterCollector(database))

    def _loaded_models(self, device: str, load_generator: Callable[[], ImageGenerator] | None,
                       load_model: Callable[[str], ImageGenerator] | None) -> LoadedModels:
        catalog = self.catalog
        # A stand-in generator runs on no real device: a share of its memory is
        # no limit, an amount is (tests of the budget use one).
        budget = partial(memory_budget_bytes, self.config.engine.gpu_memory_budget, 2**62)
        if load_model is not None:
            return LoadedModels(load_model, budget, device)
        if load_generator is not None:
            return LoadedModels(lambda name: load_generator(), budget, device)
        from appliance.engine.diffusers_generator import load_configured_generator

        def load(name: str) -> ImageGenerator:
            return load_configured_generator(self.config, device, catalog.served(name),
                                             catalog.lora_path)

        def estimate(name: str) -> int:
            model = catalog.served(name)
            return weights_on_disk(model.path, model.dtype)

        return LoadedModels(load, partial(gpu.memory_budget, self.config.engine, device), device,
                            estimate=estimate, release=gpu.release_unloaded_models)

    @property
    def worker(self) -> Worker:
        """The first worker (the only one on a single device)."""
        return self.workers[0]

    def start(self) -> None:
        if self.cluster is not None:
            self.cluster.start()
        else:
            recovered = unfinished_images(self.database.db())
            if recovered:
                log.info("re-queued %d images left unfinished when the service last stopped",
                         len(recovered))
            self.queue.put_recovered(recovered)
        for worker in self.workers:
            worker.start()

    def stop(self) -> None:
        if self.cluster is not None:
            # No more claims; what the node holds and does not finish below, it gives back
            # at its next start, or another node takes once the leases run out.
            self.cluster.stop()
        for worker in self.workers:
            worker.signal_stop()
        for worker in self.workers:
            worker.join(STOP_TIMEOUT_SECONDS)
        # Batches already generated are saved and recorded before the database closes.
        self.writer.close()
        if self.cluster is not None:
            self.cluster.leave()
        gpu.log_peak_memory()

    @property
    def ready(self) -> bool:
        """Every worker has its model loaded and warmed up, and runs."""
        return all(w.ready.is_set() and w.is_alive() for w in self.workers)

    @property
    def loading(self) -> bool:
        return not all(w.ready.is_set() for w in self.workers)

    @property
    def load_error(self) -> BaseException | None:
        return next((w.load_error for w in self.workers if w.load_error), None)

    @property
    def heartbeat(self) -> float:
        """The stalest worker's heartbeat (time.monotonic)."""
        return min(w.heartbeat for w in self.workers)

    def worker_problem(self, stall_limit: float) -> str | None:
        """Why the workers cannot take work, or None while they keep coming back to the queue."""
        if not all(worker.is_alive() for worker in self.workers):
            return "an engine worker has stopped"
        stalled = time.monotonic() - self.heartbeat
        if stalled > stall_limit:
            return (f"an engine worker has not come back for {stalled:.0f} s (limit"
                    f" {stall_limit:.0f} s): a batch is hung")
        return None

    def status(self) -> EngineStatus:
        """The running engine at this moment: what /metrics and the console's system page show."""
        # In cluster mode the queue that matters is the cluster's, not the node's prefetch.
        by_account = (self.cluster.depth_by_account() if self.cluster is not None else None)
        if by_account is None:
            by_account = self.queue.depth_by_account()
        return EngineStatus(queue_depth=sum(by_account.values()), ready=self.ready,
                            heartbeat_age_seconds=max(0.0, time.monotonic() - self.heartbeat),
                            workers=tuple(self._worker_status(device, worker) for device, worker
                                          in zip(self.devices, self.workers, strict=True)),
                            queue_by_account=by_account,
                            images_per_minute=self.metrics.rate.per_minute(),
                            gpu_memory=tuple(gpu.memory_by_device()))

    def _worker_status(self, device: str, worker: Worker) -> WorkerStatus:
        batches = worker.batches_in_progress()
        newest = batches[-1] if batches else None
        return WorkerStatus(name=worker.name, device=device, ready=worker.ready.is_set(),
                            alive=worker.is_alive(), max_batch_size=worker.batch_size,
                            batches_in_flight=len(batches),
                            batch_size=newest.size if newest else None,
                            batch_settings=newest.settings if newest else None,
                            models=tuple(worker.models.sizes().items()),
                            model_budget_bytes=worker.models.budget_bytes)
