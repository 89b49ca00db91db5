"""Jobs and their images in the database: write, read, start, finish, cancel, refund.

A failed or cancelled image is refunded in the transaction that marks it, so
credits_used minus credits_refunded is always what the account paid for
images it received. The statuses and their order are in models.py.
"""

from __future__ import annotations

import secrets
import uuid
from collections import defaultdict
from collections.abc import Iterable, Sequence
from datetime import date, timedelta
from pathlib import Path
from typing import Any

from appliance.accounts.accounts import change_credits
from appliance.core.clock import utc_now
from appliance.core.database import Database, immediate, insert
from appliance.core.errors import NotFound
from appliance.jobs.models import (
    MAX_SEED,
    PENDING_IMAGE_STATUSES,
    GalleryFilter,
    GalleryImage,
    GenerationSettings,
    ImageStatus,
    ImageView,
    JobStatus,
    JobSummary,
    JobView,
    KeyChoice,
    QueuedImage,
    Submitted,
)


def submit(
    db: Database,
    account_id: int,
    api_key_id: int | None,
    prompts: list[str],
    settings: GenerationSettings,
    seed: int | None = None,
    credits_per_image: int = 1,
) -> Submitted:
    """Charges `credits_per_image` an image and writes the job, all in one transaction.

    The caller reserves queue room first and enqueues `images` afterwards;
    if this raises, nothing was charged or written.
    """
    job_id = str(uuid.uuid4())
    now = utc_now()
    count = len(prompts)
    cost = count * credits_per_image
    seeds = image_seeds(count, seed)
    with immediate(db):
        # The job row first: the ledger row refers to it.
        db.execute(
            "INSERT INTO jobs (id, account_id, api_key_id, status, total_images, credits_used,"
            " credits_per_image, settings, seed, created_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [job_id, account_id, api_key_id, JobStatus.QUEUED, count, cost, credits_per_image,
             settings.to_json(), seed, now],
        )
        balance = change_credits(db, account_id, -cost, "image job", job_id)
        image_ids = [
            insert(db, "INSERT INTO job_images (job_id, idx, prompt, seed, status)"
                       " VALUES (?, ?, ?, ?, ?)", [job_id, i, prompt, seed, ImageStatus.QUEUED])
            for i, (prompt, seed) in enumerate(zip(prompts, seeds, strict=True))
        ]
    images = [
        QueuedImage(image_id, job_id, account_id, i, prompt, seed, settings)
        for i, (image_id, prompt, seed) in enumerate(zip(image_ids, prompts, seeds, strict=True))
    ]
    return Submitted(job_id, count, cost, balance, images)


def image_seeds(count: int, base_seed: int | None) -> list[int]:
    """Image i gets base_seed + i, wrapping past MAX_SEED to 0; without a base, random seeds."""
    if base_seed is None:
        return [secrets.randbelow(MAX_SEED + 1) for _ in range(count)]
    return [(base_seed + i) % (MAX_SEED + 1) for i in range(count)]


# The columns of job_images an ImageView is made from, in image_view's order.
IMAGE_COLUMNS = ("idx", "prompt", "status", "seed", "error", "finished_at")


def image_view(values: Sequence[Any]) -> ImageView:
    """An image from the values of IMAGE_COLUMNS, in that order."""
    index, prompt, status, seed, error, finished_at = values
    return ImageView(index, prompt, ImageStatus(status), seed, error, finished_at)


def _job_not_found() -> NotFound:
    # Another account's job is answered exactly like one that does not exist.
    return NotFound("Job not found")


def _check_owner(db: Database, account_id: int, job_id: str) -> None:
    row = db.execute("SELECT 1 FROM jobs WHERE id = ? AND account_id = ?",
                     [job_id, account_id]).fetchone()
    if row is None:
        raise _job_not_found()


# A status poll is the request clients send most: get_job reads the job and its
# images in one statement, through execute() with its columns named (sqlite-utils'
# query() wraps each SELECT in a savepoint, three statements, and makes a dict a row).
_JOB_WITH_IMAGES = (
    "SELECT j.status, j.total_images, j.credits_used, j.credits_refunded, j.created_at,"
    " j.started_at, j.finished_at, j.settings, j.seed, j.credits_per_image, "
    + ", ".join(f"i.{column}" for column in IMAGE_COLUMNS)
    + " FROM jobs j LEFT JOIN job_images i ON i.job_id = j.id"
    " WHERE j.id = ? AND j.account_id = ? ORDER BY i.idx")


def get_job(db: Database, account_id: int, job_id: str) -> JobView:
    rows = db.execute(_JOB_WITH_IMAGES, [job_id, account_id]).fetchall()
    if not rows:
        raise _job_not_found()
    (status, total_images, credits_used, credits_refunded, created_at, started_at, finished_at,
     settings, seed, credits_per_image) = rows[0][:10]
    # A job always has images; an image's index is never null.
    images = [image_view(row[10:]) for row in rows if row[10] is not None]
    counts: defaultdict[str, int] = defaultdict(int)
    for image in images:
        counts[image.status] += 1
    return JobView(
        job_id=job_id,
        status=JobStatus(status),
        total_images=total_images,
        queued_images=counts[ImageStatus.QUEUED],
        running_images=counts[ImageStatus.RUNNING],
        completed_images=counts[ImageStatus.COMPLETED],
        failed_images=counts[ImageStatus.FAILED],
        credits_used=credits_used,
        credits_refunded=credits_refunded,
        created_at=created_at,
        started_at=started_at,
        finished_at=finished_at,
        settings=GenerationSettings.from_json(settings),
        images=images,
        cancelled_images=counts[ImageStatus.CANCELLED],
        seed=seed,
        credits_per_image=credits_per_image,
    )


def image_file(db: Database, images_dir: Path, account_id: int, job_id: str, index: int) -> Path:
    # One statement: the job's owner, and the image's file once it is made.
    row = db.execute(
        "SELECT i.file FROM jobs j LEFT JOIN job_images i"
        " ON i.job_id = j.id AND i.idx = ? AND i.status = ?"
        " WHERE j.id = ? AND j.account_id = ?",
        [index, ImageStatus.COMPLETED, job_id, account_id],
    ).fetchone()
    if row is None:
        raise _job_not_found()
    if not row[0]:
        raise NotFound(f"image {index} of this job is not ready")
    return images_dir / row[0]


def image_relpath(job_id: str, index: int) -> str:
    return f"{job_id}/{index}.png"


# An image's end or start is recorded only by the node that holds its claim (cluster
# mode, jobs/shared_queue.py); on one machine nothing is claimed and `node` passes.
_STILL_OURS = "(claimed_by IS NULL OR claimed_by = ?)"


def mark_running(db: Database, images: Iterable[QueuedImage], node: str | None = None
                 ) -> list[QueuedImage]:
    """Starts the images still queued (and still this node's); returns those (others were
    cancelled, ended, or claimed by another node)."""
    images = list(images)
    now = utc_now()
    with immediate(db):
        started = [
            image for image in images
            if db.execute("UPDATE job_images SET status = ?, started_at = ?"
                          f" WHERE id = ? AND status = ? AND {_STILL_OURS}",
                          [ImageStatus.RUNNING, now, image.image_id, ImageStatus.QUEUED,
                           node]).rowcount
        ]
        db.executemany(
            "UPDATE jobs SET status = ?, started_at = COALESCE(started_at, ?) WHERE id = ?",
            [(JobStatus.PROCESSING, now, job_id) for job_id in {image.job_id for image in started}],
        )
    return started


def mark_completed(db: Database, images: Iterable[QueuedImage], node: str | None = None
                   ) -> None:
    """Records the images as made by `node`, those still owed and still its own: an image
    made by two nodes (one thought dead) is recorded once."""
    images = list(images)
    now = utc_now()
    with immediate(db):
        db.executemany(
            "UPDATE job_images SET status = ?, file = ?, finished_at = ?, made_by = ?,"
            " claimed_by = NULL, lease_until = NULL"
            f" WHERE id = ? AND status IN (?, ?) AND {_STILL_OURS}",
            [(ImageStatus.COMPLETED, image_relpath(i.job_id, i.index), now, node, i.image_id,
              *PENDING_IMAGE_STATUSES, node) for i in images],
        )
        _settle_jobs(db, {i.job_id for i in images}, now)


def mark_failed(db: Database, images: Iterable[QueuedImage], error: str,
                node: str | None = None) -> None:
    """Fails the images (those still owed and still this node's) and refunds each one's
    credit through the ledger."""
    images = list(images)
    now = utc_now()
    with immediate(db):
        per_job: dict[tuple[str, int], int] = defaultdict(int)
        for image in images:
            changed = db.execute(
                "UPDATE job_images SET status = ?, error = ?, finished_at = ?, made_by = ?,"
                " claimed_by = NULL, lease_until = NULL"
                f" WHERE id = ? AND status IN (?, ?) AND {_STILL_OURS}",
                [ImageStatus.FAILED, error, now, node, image.image_id,
                 *PENDING_IMAGE_STATUSES, node],
            ).rowcount
            # Only an image that was still owed is refunded, so a retry of
            # this call can never refund twice.
            if changed:
                per_job[(image.job_id, image.account_id)] += 1
        for (job_id, account_id), count in per_job.items():
            _refund(db, account_id, job_id, count, "refund: image failed")
        _settle_jobs(db, {i.job_id for i in images}, now)


def cancel(db: Database, account_id: int, job_id: str) -> int:
    """Cancels the job's images not yet started and refunds them; returns how many.

    Images already running finish and stay paid for. Safe to repeat: a second
    call finds nothing queued and refunds nothing.
    """
    now = utc_now()
    with immediate(db):
        _check_owner(db, account_id, job_id)
        # The worker starts an image only while it is still queued (mark_running),
        # so an image cancelled here is never generated, even if already dequeued.
        count = db.execute(
            "UPDATE job_images SET status = ?, finished_at = ? WHERE job_id = ? AND status = ?",
            [ImageStatus.CANCELLED, now, job_id, ImageStatus.QUEUED],
        ).rowcount
        if count:
            _refund(db, account_id, job_id, count, "refund: image cancelled")
            _settle_jobs(db, {job_id}, now)
    return count


def _refund(db: Database, account_id: int, job_id: str, images: int, reason: str) -> None:
    """Gives back what `images` of the job cost, at the price it was charged."""
    db.execute("UPDATE jobs SET credits_refunded = credits_refunded + credits_per_image * ?"
               " WHERE id = ?", [images, job_id])
    price = db.execute("SELECT credits_per_image FROM jobs WHERE id = ?", [job_id]).fetchone()[0]
    change_credits(db, account_id, images * price, reason, job_id)


def _settle_jobs(db: Database, job_ids: set[str], now: str) -> None:
    """Gives jobs whose images have all ended their final status (see the module's text)."""
    for job_id in job_ids:
        open_count, completed, failed = db.execute(
            "SELECT COUNT(*) FILTER (WHERE status IN (?, ?)),"
            " COUNT(*) FILTER (WHERE status = ?), COUNT(*) FILTER (WHERE status = ?)"
            " FROM job_images WHERE job_id = ?",
            [*PENDING_IMAGE_STATUSES, ImageStatus.COMPLETED, ImageStatus.FAILED, job_id],
        ).fetchone()
        if open_count == 0:
            status = (JobStatus.COMPLETED if completed else JobStatus.FAILED if failed
                      else JobStatus.CANCELLED)
            db.execute("UPDATE jobs SET status = ?, finished_at = ? WHERE id = ?",
                       [status, now, job_id])


def unfinished_images(db: Database) -> list[QueuedImage]:
    """Images accepted but not finished when the process last stopped, oldest first.

    Running ones go back to queued: their PNG may be half-written, and
    generating again from the stored seed gives the same picture.
    """
    with immediate(db):
        db.execute("UPDATE job_images SET status = ?, started_at = NULL WHERE status = ?",
                   [ImageStatus.QUEUED, ImageStatus.RUNNING])
        rows = list(
            db.query(
                "SELECT i.id, i.job_id, j.account_id, i.idx, i.prompt, i.seed, j.settings"
                " FROM job_images i JOIN jobs j ON j.id = i.job_id"
                " WHERE i.status = ? ORDER BY j.created_at, i.job_id, i.idx",
                [ImageStatus.QUEUED],
            )
        )
    return [
        QueuedImage(r["id"], r["job_id"], r["account_id"], r["idx"], r["prompt"], r["seed"],
                    GenerationSettings.from_json(r["settings"]))
        for r in rows
    ]


def list_jobs(db: Database, account_id: int, limit: int = 20, offset: int = 0) -> list[JobSummary]:
    """The account's jobs, newest first."""
    rows = list(db.query(
        "SELECT * FROM jobs WHERE account_id = ? ORDER BY created_at DESC, id LIMIT ? OFFSET ?",
        [account_id, limit, offset]))
    return _summaries(db, rows)


def pending_jobs(db: Database, account_id: int, limit: int) -> list[JobSummary]:
    """The account's jobs still waiting or generating, newest first."""
    rows = list(db.query(
        "SELECT * FROM jobs WHERE account_id = ? AND status IN (?, ?)"
        " ORDER BY created_at DESC, id LIMIT ?",
        [account_id, JobStatus.QUEUED, JobStatus.PROCESSING, limit]))
    return _summaries(db, rows)


def _summaries(db: Database, rows: list[dict[str, Any]]) -> list[JobSummary]:
    """The jobs of these rows of `jobs`, with their images."""
    images: dict[str, list[ImageView]] = defaultdict(list)
    if rows:
        marks = ", ".join("?" for _ in rows)
        for r in db.execute(
            f"SELECT job_id, {', '.join(IMAGE_COLUMNS)} FROM job_images"
            f" WHERE job_id IN ({marks}) ORDER BY job_id, idx",
            [row["id"] for row in rows],
        ):
            images[r[0]].append(image_view(r[1:]))
    return [
        JobSummary(
            job_id=row["id"],
            status=JobStatus(row["status"]),
            total_images=row["total_images"],
            completed_images=sum(i.status == ImageStatus.COMPLETED for i in images[row["id"]]),
            credits_used=row["credits_used"],
            credits_refunded=row["credits_refunded"],
            created_at=row["created_at"],
            finished_at=row["finished_at"],
            images=images[row["id"]],
        )
        for row in rows
    ]


def _gallery_where(db: Database, account_id: int, where: GalleryFilter
                   ) -> tuple[str, list[Any]]:
    """The WHERE clause shared by the gallery's page and its count."""
    # SQLite's unary + keeps it off the index on status alone, which holds every
    # account's images: the account's jobs come first (jobs_account), then their
    # images by the (job_id, idx) key.
    clauses = ["j.account_id = ?", f"{db.not_by_index}i.status = ?"]
    params: list[Any] = [account_id, ImageStatus.COMPLETED]
    if where.job_id is not None:
        clauses.append("j.id = ?")
        params.append(where.job_id)
    if where.key_id is not None:
        clauses.append("j.api_key_id = ?")
        params.append(where.key_id)
    # finished_at is ISO 8601 text, so comparing it as text is comparing times.
    if where.since is not None:
        clauses.append("i.finished_at >= ?")
        params.append(where.since.isoformat())
    # Before the day after `until`; the last day a date can name has no day after it.
    if where.until is not None and where.until < date.max:
        clauses.append("i.finished_at < ?")
        params.append((where.until + timedelta(days=1)).isoformat())
    return " AND ".join(clauses), params


def gallery_images(db: Database, account_id: int, where: GalleryFilter, limit: int,
                   offset: int) -> list[GalleryImage]:
    """The account's made images, newest job first, each job's in index order.

    CROSS JOIN makes SQLite read jobs first, in the jobs_account index's order, so
    that it sorts only within each job and stops once the page is full.
    """
    clause, params = _gallery_where(db, account_id, where)
    rows = db.execute(
        "SELECT i.job_id, i.idx, i.prompt, i.seed, j.settings, i.finished_at, k.name"
        f" FROM jobs j {db.join_in_written_order} job_images i ON i.job_id = j.id"
        " LEFT JOIN api_keys k ON k.id = j.api_key_id"
        f" WHERE {clause}"
        " ORDER BY j.created_at DESC, j.id DESC, i.idx LIMIT ? OFFSET ?",
        [*params, limit, offset]).fetchall()
    return [GalleryImage(job_id, idx, prompt, seed, GenerationSettings.from_json(settings),
                         made_at, key_name)
            for job_id, idx, prompt, seed, settings, made_at, key_name in rows]


def count_gallery_images(db: Database, account_id: int, where: GalleryFilter) -> int:
    clause, params = _gallery_where(db, account_id, where)
    return db.execute(f"SELECT COUNT(*) FROM jobs j {db.join_in_written_order} job_images i"
                      f" ON i.job_id = j.id WHERE {clause}", params).fetchone()[0]


def gallery_keys(db: Database, account_id: int) -> list[KeyChoice]:
    """The account's live keys, and its deleted ones that made an image still on show."""
    rows = db.execute(
        "SELECT k.id, k.name, k.prefix, k.deleted_at IS NOT NULL FROM api_keys k"
        " WHERE k.account_id = ? AND (k.deleted_at IS NULL OR EXISTS ("
        f"   SELECT 1 FROM jobs j {db.join_in_written_order} job_images i ON i.job_id = j.id"
        "   WHERE j.api_key_id = k.id AND j.account_id = k.account_id"
        f"  AND {db.not_by_index}i.status = ?))"
        " ORDER BY k.deleted_at IS NOT NULL, lower(k.name), k.id",
        [account_id, ImageStatus.COMPLETED]).fetchall()
    return [KeyChoice(key_id, name, prefix, bool(deleted))
            for key_id, name, prefix, deleted in rows]
