"""The bounded in-process queue between the API and the GPU workers.

Room is reserved before a job is charged and filled after it is written, so a
request is either refused up front (503, nothing charged) or fully queued.

Order: accounts take turns image by image (round-robin), so one account's
thousand-image job delays another account's single image by at most one batch.
Within an account, images keep the order they were queued in. A batch holds
images of equal settings only, since they share one pipeline call: the account
whose turn it is picks the settings (those of its oldest image), then the batch
fills in turn order from every account with images of those settings. An
account passed over for having none keeps its turn and picks the next batch.

Models: settings name a model, and loading another model into a worker takes
seconds. A worker says which models it holds, and the lead then comes from the
first account in turn order with images for one of them; the images of other
models wait until the oldest of them has waited `swap_after` seconds and the
worker has held its latest model that long: then its settings lead, and the
worker loads its model. Each model so keeps a worker for at least `swap_after`
seconds once loaded, which bounds swaps to one per `swap_after` seconds, and an
image waits at most about (models waiting + 1) x (swap_after + a load) for its
model: no account and no model waits without bound.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from appliance.jobs.admission import queue_full
from appliance.jobs.models import GenerationSettings, QueuedImage


@dataclass(order=True)
class _Entry:
    seq: int
    queued_at: float = field(compare=False)
    image: QueuedImage = field(compare=False)


class ImageQueue:
    def __init__(self, capacity: int):
        self.capacity = capacity
        # account id -> settings -> that account's images of those settings, oldest first
        self._lanes: dict[int, dict[GenerationSettings, deque[_Entry]]] = {}
        # Accounts with queued images, in the order they get their next image.
        self._turns: deque[int] = deque()
        self._count = 0
        self._reserved = 0
        self._closed = False
        self._seq = itertools.count()
        self._cond = threading.Condition()

    def __len__(self) -> int:
        with self._cond:
            return self._count

    def reserve(self, count: int) -> None:
        with self._cond:
            if self._count + self._reserved + count > self.capacity:
                free = max(0, self.capacity - self._count - self._reserved)
                raise queue_full(free, self.capacity, count)
            self._reserved += count

    def release(self, count: int) -> None:
        with self._cond:
            self._reserved -= count

    def put_reserved(self, images: list[QueuedImage]) -> None:
        with self._cond:
            self._reserved -= len(images)
            self._add(images)

    def put_recovered(self, images: list[QueuedImage]) -> None:
        """Recovered work goes in even past capacity: it was already paid for."""
        with self._cond:
            self._add(images)

    def _add(self, images: list[QueuedImage]) -> None:
        now = time.monotonic()
        for image in images:
            lanes = self._lanes.get(image.account_id)
            if lanes is None:
                lanes = self._lanes[image.account_id] = {}
                self._turns.append(image.account_id)
            lanes.setdefault(image.settings, deque()).append(_Entry(next(self._seq), now, image))
        self._count += len(images)
        self._cond.notify_all()

    def take_batch(self, max_items: int, timeout: float, window: float = 0.0,
                   loaded: frozenset[str] | None = None, swap_after: float = 0.0,
                   loaded_at: float = float("-inf")) -> list[QueuedImage]:
        """Up to max_items images of equal settings, in turn order (see the module's text).

        Waits up to `timeout` for a first image, then until `window` seconds
        after that image was queued for the batch to fill; returns [] on
        timeout or close. `loaded`: the models the worker holds, the latest
        of which it loaded at `loaded_at` (time.monotonic), whose images go
        first for `swap_after` seconds (see the module's text).
        """
        with self._cond:
            if not self._cond.wait_for(lambda: self._count or self._closed, timeout):
                return []
            while self._count:
                lead = self._lead(loaded, swap_after, loaded_at)
                settings = lead.image.settings
                wait = lead.queued_at + window - time.monotonic()
                if self._closed or wait <= 0 or self._matching(settings) >= max_items:
                    return self._take(settings, max_items)
                # Another worker may take these images meanwhile: look again after.
                self._cond.wait(wait)
            return []

    def _oldest(self, account_id: int) -> _Entry:
        return min(lane[0] for lane in self._lanes[account_id].values())

    def _lead(self, loaded: frozenset[str] | None, swap_after: float, loaded_at: float
              ) -> _Entry:
        """The image whose settings the next batch takes (see the module's text)."""
        first = self._oldest(self._turns[0])
        if loaded is None or swap_after <= 0 or first.image.settings.model in loaded:
            return first
        waiting = [lane[0] for lanes in self._lanes.values() for settings, lane in lanes.items()
                   if settings.model not in loaded]
        starving = min(waiting, key=lambda entry: entry.queued_at)
        now = time.monotonic()
        if now - starving.queued_at >= swap_after and now - loaded_at >= swap_after:
            return starving
        for account_id in self._turns:
            ready = [lane[0] for settings, lane in self._lanes[account_id].items()
                     if settings.model in loaded]
            if ready:
                return min(ready)
        return first  # nothing for a model it holds: it must load one anyway

    def _matching(self, settings: GenerationSettings) -> int:
        return sum(len(lanes.get(settings, ())) for lanes in self._lanes.values())

    def _take(self, settings: GenerationSettings, max_items: int) -> list[QueuedImage]:
        batch: list[QueuedImage] = []
        while len(batch) < max_items:
            account_id = next((a for a in self._turns if settings in self._lanes[a]), None)
            if account_id is None:
                break
            lanes = self._lanes[account_id]
            lane = lanes[settings]
            batch.append(lane.popleft().image)
            if not lane:
                del lanes[settings]
            # Served: to the back of the line, or out of it when nothing is left.
            self._turns.remove(account_id)
            if lanes:
                self._turns.append(account_id)
            else:
                del self._lanes[account_id]
        self._count -= len(batch)
        return batch

    def depth_by_account(self) -> dict[int, int]:
        """How many images each account has waiting, for the operator's view of the queue."""
        with self._cond:
            return {account_id: sum(len(lane) for lane in lanes.values())
                    for account_id, lanes in self._lanes.items()}

    def discard(self, account_id: int, job_id: str) -> int:
        """Drops the account's job's images still in line (cancelled); returns how many.

        The worker would skip them anyway (it starts only images still queued
        in the database); dropped now, they stop holding places meanwhile.
        """
        with self._cond:
            lanes = self._lanes.get(account_id)
            if lanes is None:
                return 0
            removed = 0
            for settings in list(lanes):
                kept = deque(e for e in lanes[settings] if e.image.job_id != job_id)
                removed += len(lanes[settings]) - len(kept)
                if kept:
                    lanes[settings] = kept
                else:
                    del lanes[settings]
            if not lanes:
                del self._lanes[account_id]
                self._turns.remove(account_id)
            self._count -= removed
            return removed

    def position(self, job_id: str) -> int | None:
        """How many images the workers will start before this job's first; None if none queued.

        Exact while every queued image has the same settings; otherwise an
        estimate, as batches of other settings interleave.
        """
        with self._cond:
            first: _Entry | None = None
            for lanes in self._lanes.values():
                for lane in lanes.values():
                    entry = next((e for e in lane if e.image.job_id == job_id), None)
                    if entry is not None and (first is None or entry < first):
                        first = entry
            if first is None:
                return None
            account_id = first.image.account_id
            own = sum(e < first for lane in self._lanes[account_id].values() for e in lane)
            ahead = own
            # Each round of turns gives every other account one image: those
            # before this account in line get one more round than those after.
            before = True
            for other in self._turns:
                if other == account_id:
                    before = False
                    continue
                queued = sum(len(lane) for lane in self._lanes[other].values())
                ahead += min(queued, own + before)
            return ahead

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
