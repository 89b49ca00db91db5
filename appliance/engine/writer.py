"""PNG encoding and file writes, in a pool of threads beside the GPU threads.

Encoding a 512x512 PNG takes tens of milliseconds of CPU; done on the GPU
thread it would leave the GPU idle for that long after every batch. Pillow and
zlib let go of the GIL while they work, so the pool runs in parallel.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Protocol

from PIL import Image

from appliance.engine.storage import write_png_atomic
from appliance.jobs.models import QueuedImage
from appliance.jobs.store import image_relpath

# (saved images, {image: why it failed}) once every image of a batch has ended.
BatchDone = Callable[[list[QueuedImage], dict[QueuedImage, str]], None]


class BatchImages(Protocol):
    seconds: float | None

    def __len__(self) -> int: ...

    def image(self, index: int) -> Image.Image: ...


def default_threads() -> int:
    return max(1, min(8, (os.cpu_count() or 2) // 2))


class ImageWriter:
    def __init__(self, images_dir: Path, threads: int, compress_level: int):
        self.images_dir = images_dir
        self.compress_level = compress_level
        self.threads = threads or default_threads()
        self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="png-writer")

    def write(self, batch: list[QueuedImage], images: BatchImages, done: BatchDone) -> None:
        """Saves images.image(i) for batch[i], one task each; `done` runs once all have ended.

        Raises RuntimeError once closed.
        """
        tally = _Tally(len(batch), done)
        for index, item in enumerate(batch):
            future = self._pool.submit(self._save, images, index, item)
            future.add_done_callback(partial(tally.add, item))

    def _save(self, images: BatchImages, index: int, item: QueuedImage) -> str | None:
        """None once saved, else why not, as the job's image will show it."""
        try:
            image = images.image(index)
        except Exception as exc:  # noqa: BLE001 - an error of the GPU work surfaces here
            return f"generation failed: {type(exc).__name__}: {exc}"
        try:
            write_png_atomic(image, self.images_dir / image_relpath(item.job_id, item.index),
                             self.compress_level)
        except Exception as exc:  # noqa: BLE001 - a full disk fails the image, not the worker
            return f"saving the image failed: {type(exc).__name__}: {exc}"
        return None

    def close(self) -> None:
        """Finishes the batches already handed over, then stops the threads."""
        self._pool.shutdown(wait=True)


class _Tally:
    def __init__(self, count: int, done: BatchDone):
        self._left = count
        self._done = done
        self._lock = threading.Lock()
        self._saved: list[QueuedImage] = []
        self._failed: dict[QueuedImage, str] = {}

    def add(self, item: QueuedImage, future: Future) -> None:
        error = future.exception() or future.result()
        with self._lock:
            if error:
                self._failed[item] = str(error)
            else:
                self._saved.append(item)
            self._left -= 1
            last = self._left == 0
        if last:
            self._done(self._saved, self._failed)


class ReadyImages:
    """Images a generator returned whole (the test generators do)."""

    def __init__(self, images: Sequence[Image.Image], started: float):
        self._images = list(images)
        self.seconds: float | None = time.perf_counter() - started

    def __len__(self) -> int:
        return len(self._images)

    def image(self, index: int) -> Image.Image:
        return self._images[index]
