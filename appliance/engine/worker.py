"""The worker thread: the only code that touches the pipeline."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from PIL import Image

from .. import jobs
from ..db import Store
from ..jobs import GenerationSettings, QueuedImage
from .queue import ImageQueue
from .storage import write_png_atomic

log = logging.getLogger(__name__)


class ImageGenerator(Protocol):
    def generate(self, prompts: list[str], seeds: list[int],
                 settings: GenerationSettings) -> list[Image.Image]: ...


class Worker(threading.Thread):
    def __init__(
        self,
        store: Store,
        queue: ImageQueue,
        load_generator: Callable[[], ImageGenerator],
        images_dir: Path,
        batch_size: int,
    ):
        # A daemon, so a GPU call that never returns cannot hold the process open.
        super().__init__(name="engine-worker", daemon=True)
        self.store = store
        self.queue = queue
        self.load_generator = load_generator
        self.images_dir = images_dir
        self.batch_size = batch_size
        self.ready = threading.Event()
        self.load_error: BaseException | None = None
        self.heartbeat = time.monotonic()
        self._stopping = threading.Event()

    def stop(self, timeout: float = 30.0) -> None:
        self._stopping.set()
        self.queue.close()
        self.join(timeout)

    def run(self) -> None:
        try:
            generator = self.load_generator()
        except BaseException as exc:  # noqa: BLE001 - reported through readiness and the log
            self.load_error = exc
            log.error("the model could not be loaded: %s", exc)
            return
        self.ready.set()
        while not self._stopping.is_set():
            self.heartbeat = time.monotonic()
            batch = self.queue.take_batch(self.batch_size, timeout=0.5)
            if batch:
                self.process(generator, batch)

    def process(self, generator: ImageGenerator, batch: list[QueuedImage]) -> None:
        db = self.store.db()
        batch = jobs.mark_running(db, batch)
        if not batch:
            return
        started = time.perf_counter()
        try:
            images = generator.generate([i.prompt for i in batch], [i.seed for i in batch],
                                        batch[0].settings)
            for item, image in zip(batch, images, strict=True):
                write_png_atomic(image, self.images_dir / jobs.image_relpath(item.job_id, item.index))
        except Exception as exc:  # noqa: BLE001 - any failure fails and refunds the batch
            log.exception("a batch of %d images failed", len(batch))
            jobs.mark_failed(db, batch, f"generation failed: {type(exc).__name__}: {exc}")
            return
        jobs.mark_completed(db, batch)
        log.info("generated %d images in %.2f s", len(batch), time.perf_counter() - started)
