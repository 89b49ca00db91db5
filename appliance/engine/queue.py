"""The bounded in-process queue between the API and the GPU worker.

Room is reserved before a job is charged and filled after it is written, so a
request is either refused up front (503, nothing charged) or fully queued.
"""

from __future__ import annotations

import threading
from collections import deque

from ..errors import ServiceUnavailable
from ..jobs import QueuedImage

RETRY_AFTER_SECONDS = 5


class ImageQueue:
    def __init__(self, capacity: int):
        self.capacity = capacity
        self._items: deque[QueuedImage] = deque()
        self._reserved = 0
        self._closed = False
        self._cond = threading.Condition()

    def __len__(self) -> int:
        with self._cond:
            return len(self._items)

    def reserve(self, count: int) -> None:
        with self._cond:
            if len(self._items) + self._reserved + count > self.capacity:
                free = max(0, self.capacity - len(self._items) - self._reserved)
                raise ServiceUnavailable(
                    f"The queue is full ({free} of {self.capacity} places free, {count} asked);"
                    " try again shortly",
                    retry_after=RETRY_AFTER_SECONDS,
                )
            self._reserved += count

    def release(self, count: int) -> None:
        with self._cond:
            self._reserved -= count

    def put_reserved(self, images: list[QueuedImage]) -> None:
        with self._cond:
            self._reserved -= len(images)
            self._items.extend(images)
            self._cond.notify_all()

    def put_recovered(self, images: list[QueuedImage]) -> None:
        """Recovered work goes in even past capacity: it was already paid for."""
        with self._cond:
            self._items.extend(images)
            self._cond.notify_all()

    def take_batch(self, max_items: int, timeout: float) -> list[QueuedImage]:
        """Up to max_items queued images sharing the oldest one's settings.

        Waits up to `timeout` for the first; returns [] on timeout or close.
        """
        with self._cond:
            if not self._cond.wait_for(lambda: self._items or self._closed, timeout):
                return []
            if not self._items:
                return []
            settings = self._items[0].settings
            batch: list[QueuedImage] = []
            kept: deque[QueuedImage] = deque()
            while self._items and len(batch) < max_items:
                image = self._items.popleft()
                (batch if image.settings == settings else kept).append(image)
            kept.extend(self._items)
            self._items = kept
            return batch

    def position(self, job_id: str) -> int | None:
        """How many images the worker will take before this job's first; None if none queued."""
        with self._cond:
            for ahead, image in enumerate(self._items):
                if image.job_id == job_id:
                    return ahead
            return None

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
