"""Admitting a job: every check that decides whether it is charged, and the charge.

One write transaction holds them all: the earlier answer to the same
Idempotency-Key, the account's limit on pending images, room in the queue, the
charge with the job's rows, and the record of the answer. A refusal or a
failure at any step (a locked or full database included) keeps nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from sqlite_utils import Database

from appliance.core.clock import utc_now
from appliance.core.database import immediate
from appliance.core.errors import TooManyRequests
from appliance.jobs import idempotency
from appliance.jobs.models import PENDING_IMAGE_STATUSES, QueuedImage, Submitted

# A hint only: how soon some of the account's images are likely to have ended.
PENDING_RETRY_AFTER_SECONDS = 10


class Queue(Protocol):
    def reserve(self, count: int) -> None: ...
    def release(self, count: int) -> None: ...
    def put_reserved(self, images: list[QueuedImage]) -> None: ...


def pending_images(db: Database, account_id: int) -> int:
    return db.execute(
        "SELECT COUNT(*) FROM job_images i JOIN jobs j ON j.id = i.job_id"
        " WHERE i.status IN (?, ?) AND j.account_id = ?",
        [*PENDING_IMAGE_STATUSES, account_id],
    ).fetchone()[0]


def check_pending(db: Database, account_id: int, count: int, limit: int) -> None:
    pending = pending_images(db, account_id)
    if pending + count > limit:
        raise TooManyRequests(
            f"This account has {pending} images waiting or generating and may have at most"
            f" {limit} at once; {count} more do not fit. Try again when some have finished",
            retry_after=PENDING_RETRY_AFTER_SECONDS,
        )


def admit(
    db: Database,
    queue: Queue,
    account_id: int,
    count: int,
    max_pending: int,
    request: idempotency.IdempotentRequest | None,
    submit: Callable[[], Submitted],
) -> Submitted:
    """Charges and queues the job that `submit` writes, or answers a retry as the first time.

    `submit` charges and writes the job through `jobs.submit` on this same
    connection; its transaction joins this one.
    """
    reserved = False
    try:
        with immediate(db):
            if request and (earlier := idempotency.earlier_answer(db, account_id, request)):
                return Submitted(earlier.job_id, earlier.total_images, earlier.credits_used,
                                 earlier.credits, images=[], replayed=True)
            check_pending(db, account_id, count, max_pending)
            queue.reserve(count)
            reserved = True
            submitted = submit()
            if request:
                idempotency.remember(db, account_id, request, idempotency.Answer(
                    submitted.job_id, submitted.total_images, submitted.credits_used,
                    submitted.credits), utc_now())
    except BaseException:
        if reserved:
            queue.release(count)
        raise
    # Only after the commit: the worker must never take an image the database lacks.
    queue.put_reserved(submitted.images)
    return submitted
