"""What a submitted job must fit in: the account's limit on images waiting or generating,
and the queue's room."""

from __future__ import annotations

from appliance.core.database import Database
from appliance.core.errors import ServiceUnavailable, TooManyRequests
from appliance.jobs.models import PENDING_IMAGE_STATUSES

# A hint only: how soon some of the account's images are likely to have ended.
PENDING_RETRY_AFTER_SECONDS = 10
# A hint only: how soon the queue is likely to have room again.
QUEUE_RETRY_AFTER_SECONDS = 5


def queue_full(free: int, capacity: int, count: int) -> ServiceUnavailable:
    """The queue (one machine's, or the cluster's) has no room for `count` more images."""
    return ServiceUnavailable(
        f"The queue is full ({free} of {capacity} places free, {count} asked);"
        " try again shortly", retry_after=QUEUE_RETRY_AFTER_SECONDS)


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
