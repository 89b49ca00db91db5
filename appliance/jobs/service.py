"""The job service: submit, read, list, cancel, and the finished images' files.

Every front end (the native API, the OpenAI endpoint, the console) calls it
with values it has already parsed and checked (parameters.py); it knows
nothing of HTTP.

Submitting is one write transaction holding every check that decides whether
the job is charged: the earlier answer to the same Idempotency-Key, the
account's limit on pending images, room in the queue, the charge with the
job's rows, and the record of the answer. A refusal or a failure at any step
(a locked or full database included) keeps nothing. The images go into the
queue only after the commit, so a worker never takes an image the database
lacks.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import date
from pathlib import Path
from typing import Protocol

from appliance.core.cached_reads import on_local_disk
from appliance.core.clock import utc_now
from appliance.core.config import LimitsConfig
from appliance.core.database import ConnectionPool, immediate
from appliance.jobs import admission, idempotency, store, usage
from appliance.jobs.idempotency import IdempotentRequest
from appliance.jobs.models import (
    GalleryFilter,
    GalleryPage,
    GenerationSettings,
    JobSummary,
    JobView,
    KeyChoice,
    QueuedImage,
    Submitted,
)


class JobQueue(Protocol):
    """What the service needs of the engine's queue (engine/queue.py)."""

    def reserve(self, count: int) -> None: ...
    def release(self, count: int) -> None: ...
    def put_reserved(self, images: list[QueuedImage]) -> None: ...
    def discard(self, account_id: int, job_id: str) -> int: ...
    def position(self, job_id: str) -> int | None: ...


@dataclass(frozen=True)
class JobRequest:
    """A bulk job as a front end asks for it, every value already checked."""

    account_id: int
    # The API key that asked; None for the console's playground, where the
    # signed-in account itself asked.
    key_id: int | None
    prompts: list[str]
    settings: GenerationSettings
    seed: int | None = None
    idempotency: IdempotentRequest | None = None
    # The model's price (catalog.InstalledModel.credits_per_image).
    credits_per_image: int = 1


@dataclass(frozen=True)
class Usage:
    days: int
    images_per_day: list[usage.DayImages]
    credits_per_key: list[usage.KeySpend]


class JobService:
    def __init__(self, database: ConnectionPool, queue: JobQueue, limits: LimitsConfig,
                 images_dir: Path):
        self.database = database
        self.queue = queue
        self.limits = limits
        self.images_dir = images_dir
        # Whether a cached image may be read on the event loop (cached_reads.py).
        self.images_on_local_disk = on_local_disk(images_dir)

    def submit(self, request: JobRequest) -> Submitted:
        """Charges and queues the job, or answers a retried Idempotency-Key as the first time."""
        db = self.database.db()
        account_id, count = request.account_id, len(request.prompts)
        reserved = False
        try:
            with immediate(db):
                if request.idempotency and (
                        earlier := idempotency.earlier_answer(db, account_id, request.idempotency)):
                    return Submitted(earlier.job_id, earlier.total_images, earlier.credits_used,
                                     earlier.credits, images=[], replayed=True)
                admission.check_pending(db, account_id, count,
                                        self.limits.max_pending_images_per_account)
                self.queue.reserve(count)
                reserved = True
                submitted = store.submit(db, account_id, request.key_id, request.prompts,
                                         request.settings, request.seed,
                                         request.credits_per_image)
                if request.idempotency:
                    idempotency.remember(db, account_id, request.idempotency, idempotency.Answer(
                        submitted.job_id, submitted.total_images, submitted.credits_used,
                        submitted.credits), utc_now())
        except BaseException:
            if reserved:
                self.queue.release(count)
            raise
        self.queue.put_reserved(submitted.images)
        return submitted

    def read(self, account_id: int, job_id: str) -> JobView:
        """The job as its owner sees it; another account's job is NotFound like an unknown one."""
        job = store.get_job(self.database.db(), account_id, job_id)
        # Only images still queued make a position.
        if not job.queued_images:
            return job
        return replace(job, queue_position=self.queue.position(job_id))

    def cancel(self, account_id: int, job_id: str) -> int:
        """Cancels and refunds the job's images not yet started; returns how many.

        They also leave the queue at once, so they neither count in other jobs'
        queue positions nor hold places in a full queue.
        """
        cancelled = store.cancel(self.database.db(), account_id, job_id)
        self.queue.discard(account_id, job_id)
        return cancelled

    def page(self, account_id: int, limit: int, offset: int = 0) -> list[JobSummary]:
        """The account's jobs, newest first."""
        return store.list_jobs(self.database.db(), account_id, limit, offset)

    def usage(self, account_id: int, today: date) -> Usage:
        """The account's images a day and credits per key over the last USAGE_DAYS days."""
        db = self.database.db()
        return Usage(usage.USAGE_DAYS, usage.images_per_day(db, account_id, today),
                     usage.credits_per_key(db, account_id, today))

    def gallery(self, account_id: int, where: GalleryFilter, limit: int,
                offset: int = 0) -> GalleryPage:
        """The account's made images across its jobs, newest first, and how many match."""
        db = self.database.db()
        return GalleryPage(store.gallery_images(db, account_id, where, limit, offset),
                           store.count_gallery_images(db, account_id, where))

    def pending(self, account_id: int, limit: int) -> list[JobSummary]:
        """The account's jobs still waiting or generating, newest first."""
        return store.pending_jobs(self.database.db(), account_id, limit)

    def gallery_keys(self, account_id: int) -> list[KeyChoice]:
        """The keys the gallery can filter by: live ones and deleted ones with images."""
        return store.gallery_keys(self.database.db(), account_id)

    def image_path(self, account_id: int, job_id: str, index: int) -> Path:
        """The PNG of a finished image of the account's job (NotFound otherwise)."""
        return store.image_file(self.database.db(), self.images_dir, account_id, job_id, index)
