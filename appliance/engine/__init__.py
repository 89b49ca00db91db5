"""The engine: the queue, the worker that owns the pipeline, and model loading."""

from __future__ import annotations

import logging
from collections.abc import Callable

from ..config import Config
from ..db import Store
from ..jobs import unfinished_images
from .queue import ImageQueue
from .worker import ImageGenerator, Worker

log = logging.getLogger(__name__)


class Engine:
    def __init__(self, config: Config, store: Store,
                 load_generator: Callable[[], ImageGenerator] | None = None):
        self.config = config
        self.store = store
        self.queue = ImageQueue(config.engine.queue_capacity)
        if load_generator is None:
            from .diffusers_generator import load_configured_generator

            def load_generator() -> ImageGenerator:
                return load_configured_generator(config)

        self.worker = Worker(store, self.queue, load_generator, config.images_dir,
                             config.engine.batch_size)

    def start(self) -> None:
        recovered = unfinished_images(self.store.db())
        if recovered:
            log.info("re-queued %d images left unfinished when the service last stopped",
                     len(recovered))
        self.queue.put_recovered(recovered)
        self.worker.start()

    def stop(self) -> None:
        self.worker.stop()

    @property
    def ready(self) -> bool:
        return self.worker.ready.is_set() and self.worker.is_alive()
