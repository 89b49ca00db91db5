"""A worker thread per device: the only code that touches that device's pipeline.

The thread takes a batch, starts the GPU work and hands the images to the PNG
writers, then takes the next batch at once; the batch ends (rows marked, credits
refunded for failures) on the writer thread that saves its last image.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Protocol

from PIL import Image

from appliance.core.database import ConnectionPool, DatabaseError, OperationalError
from appliance.engine.loaded_models import LoadedModels
from appliance.engine.metrics import EngineMetrics
from appliance.engine.queue import ImageQueue
from appliance.engine.writer import BatchImages, ImageWriter, ReadyImages
from appliance.jobs.models import GenerationSettings, QueuedImage
from appliance.jobs.store import mark_completed, mark_failed, mark_running

log = logging.getLogger(__name__)

# Batches made but not yet saved, per worker: one being written while the next
# is generated, and one spare for jitter. Beyond that the GPU waits for the
# writers instead of piling images up in memory.
BATCHES_IN_FLIGHT = 3

# Waits between tries to record a batch's end while the database is locked
# (a long backup, another writer) or full; the last repeats until it works.
RECORD_RETRY_SECONDS = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0)


@dataclass(frozen=True)
class BatchInProgress:
    """A batch started and not yet ended, as the operator's system page shows it."""

    size: int
    settings: GenerationSettings
    started: float  # time.monotonic


class ImageGenerator(Protocol):
    """Makes a batch's images. A generator may also have `launch(prompts, seeds,
    settings) -> BatchImages`, which returns before the images are on the CPU;
    the worker prefers it."""

    def generate(self, prompts: list[str], seeds: list[int],
                 settings: GenerationSettings) -> list[Image.Image]: ...


class Worker(threading.Thread):
    def __init__(
        self,
        database: ConnectionPool,
        queue: ImageQueue,
        models: LoadedModels,
        writer: ImageWriter,
        metrics: EngineMetrics,
        batch_size: int,
        batch_window: float = 0.0,
        name: str = "engine-worker",
        default_model: str = "",
        swap_after: float = 0.0,
        load_failed: Callable[[str, str], None] = lambda model, problem: None,
        node: str | None = None,
    ):
        """`models` loads and holds this worker's models; the default one is loaded before
        the worker counts as ready. `load_failed(model, problem)` is told of a model that
        could not be loaded (the catalog then refuses requests for it). `node`: this
        appliance's name, recorded with each image it makes; in cluster mode it records
        only images whose claim is still its own."""
        # A daemon, so a GPU call that never returns cannot hold the process open.
        super().__init__(name=name, daemon=True)
        self.database = database
        self.queue = queue
        self.node = node
        self.models = models
        self.default_model = default_model
        self.swap_after = swap_after
        self.load_failed = load_failed
        self.writer = writer
        self.metrics = metrics
        self.batch_size = batch_size
        self.batch_window = batch_window
        self.ready = threading.Event()
        self.load_error: BaseException | None = None
        self.heartbeat = time.monotonic()
        self._stopping = threading.Event()
        self._in_flight = threading.BoundedSemaphore(BATCHES_IN_FLIGHT)
        # Batches started and not yet ended, by id() of their list: read by the
        # system page, written by this thread and the writer threads.
        self._batches: dict[int, BatchInProgress] = {}
        self._batches_lock = threading.Lock()

    def batches_in_progress(self) -> list[BatchInProgress]:
        """The batches started and not yet ended, oldest first; [] when the worker is idle."""
        with self._batches_lock:
            return sorted(self._batches.values(), key=lambda batch: batch.started)

    def _note_batch(self, batch: list[QueuedImage], started: float | None) -> None:
        with self._batches_lock:
            if started is None:
                self._batches.pop(id(batch), None)
            else:
                self._batches[id(batch)] = BatchInProgress(len(batch), batch[0].settings,
                                                           started)

    def signal_stop(self) -> None:
        self._stopping.set()
        self.queue.close()

    def stop(self, timeout: float = 30.0) -> None:
        self.signal_stop()
        self.join(timeout)

    def run(self) -> None:
        try:
            self.models.get(self.default_model)
        except BaseException as exc:  # noqa: BLE001 - reported through readiness and the log
            self.load_error = exc
            log.error("the model could not be loaded: %s", exc)
            return
        self.ready.set()
        while not self._stopping.is_set():
            self.heartbeat = time.monotonic()
            if not self._in_flight.acquire(timeout=0.5):
                continue  # the writers are behind; keep the heartbeat going meanwhile
            batch = self.queue.take_batch(self.batch_size, timeout=0.5, window=self.batch_window,
                                          loaded=self.loaded_models(),
                                          swap_after=self.swap_after,
                                          loaded_at=self.models.loaded_at)
            generator = self._generator_for(batch) if batch else None
            if generator is not None:
                self.process(generator, batch)
            elif not batch:
                self._in_flight.release()

    def loaded_models(self) -> frozenset[str]:
        """The models this worker holds; "" (jobs stored before models had names) is the
        default one."""
        names = self.models.names
        return names | {""} if self.default_model in names else names

    def _generator_for(self, batch: list[QueuedImage]) -> ImageGenerator | None:
        """The batch's model, loaded; None when it cannot be, after failing the batch."""
        name = batch[0].settings.model or self.default_model
        loads = self.models.loads
        try:
            return self.models.get(name)
        except Exception as exc:  # noqa: BLE001 - any load failure fails the images, refunded
            problem = f"the model {name!r} could not be loaded: {exc}"
            log.error("%s; %d images failed", problem, len(batch))
            if "out of memory" not in str(exc).lower():
                # A broken folder stays broken; memory may be free for the next try.
                self.load_failed(name, str(exc))
            self._batch_ended(batch, None, [], {item: problem for item in batch})
            return None
        finally:
            if self.models.loads != loads:
                # A load, however long, is the worker at work, not a hung batch.
                self.heartbeat = time.monotonic()

    def process(self, generator: ImageGenerator, batch: list[QueuedImage]) -> None:
        """Starts the batch; it ends later, on a writer thread (see _batch_ended)."""
        try:
            batch = mark_running(self.database.db(), batch, self.node)
        except DatabaseError as exc:
            # A locked, full or unreachable database: the rows are still queued, so the
            # images go back in line and are tried again shortly.
            log.warning("could not start a batch of %d images: %s", len(batch), exc)
            self.queue.put_recovered(batch)
            self._in_flight.release()
            self._stopping.wait(1.0)
            return
        if not batch:
            self._in_flight.release()
            return
        started = time.perf_counter()
        self._note_batch(batch, time.monotonic())
        try:
            images = _launch(generator, batch, started)
        except Exception as exc:
            log.exception("a batch of %d images failed", len(batch))
            error = f"generation failed: {type(exc).__name__}: {exc}"
            self._batch_ended(batch, None, [], {item: error for item in batch})
            return
        try:
            self.writer.write(batch, images,
                              lambda saved, failed: self._batch_ended(batch, images, saved, failed))
        except RuntimeError:
            # The writers were closed for shutdown: the images stay running and
            # are made again after the restart.
            log.warning("shutting down: %d images are left for the next start", len(batch))
            self._note_batch(batch, None)
            self._in_flight.release()

    def _batch_ended(self, batch: list[QueuedImage], images: BatchImages | None,
                     saved: list[QueuedImage], failed: dict[QueuedImage, str]) -> None:
        try:
            seconds = images.seconds if images is not None and images.seconds is not None else 0.0
            if saved:
                self._until_recorded(partial(self._record_completed, saved))
                self.metrics.images_generated(len(saved), seconds)
                log.info("generated %d images in %.2f s", len(saved), seconds)
            by_error: dict[str, list[QueuedImage]] = defaultdict(list)
            for item, error in failed.items():
                by_error[error].append(item)
            for error, items in by_error.items():
                if images is not None:  # a failure at launch was logged with its traceback
                    log.error("%d of a batch of %d images failed: %s", len(items), len(batch),
                              error)
                # mark_failed refunds only images still owed, so a retry cannot refund twice.
                self._until_recorded(partial(self._record_failed, items, error))
                self.metrics.images_failed(len(items))
        except Exception:
            log.exception("could not record the end of a batch of %d images", len(batch))
        finally:
            self._note_batch(batch, None)
            self._in_flight.release()

    def _record_completed(self, images: list[QueuedImage]) -> None:
        mark_completed(self.database.db(), images, self.node)

    def _record_failed(self, images: list[QueuedImage], error: str) -> None:
        mark_failed(self.database.db(), images, error, self.node)

    def _until_recorded(self, record: Callable[[], None]) -> None:
        """Runs `record` (one transaction) until a locked or full database lets it through.

        Given up only at shutdown; the images then stay running and are made
        again at the next start. Meanwhile this writer thread waits, and with
        it, once BATCHES_IN_FLIGHT batches wait, the worker: no new batch
        starts while none can end.
        """
        delays = iter(RECORD_RETRY_SECONDS)
        while True:
            try:
                record()
                return
            except OperationalError as exc:
                delay = next(delays, RECORD_RETRY_SECONDS[-1])
                log.warning("could not record the end of a batch (%s); trying again in %g s",
                            exc, delay)
                if self._stopping.wait(delay):
                    raise


def _launch(generator: ImageGenerator, batch: list[QueuedImage], started: float) -> BatchImages:
    prompts = [item.prompt for item in batch]
    seeds = [item.seed for item in batch]
    settings = batch[0].settings
    launch = getattr(generator, "launch", None)
    images = (launch(prompts, seeds, settings) if launch is not None
              else ReadyImages(generator.generate(prompts, seeds, settings), started))
    if len(images) != len(batch):
        raise RuntimeError(f"the generator made {len(images)} images for {len(batch)} prompts")
    return images
