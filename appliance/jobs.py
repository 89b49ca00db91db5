"""Bulk image jobs: submit (validate, charge, persist, enqueue), read, finish, refund.

An image row moves queued -> running -> completed | failed, or queued ->
cancelled when its owner cancels it before it starts. A failed or cancelled
image is refunded in the transaction that marks it, so credits_used minus
credits_refunded is always what the account paid for images it received.

A job is queued until one of its images starts, then processing; once every
image has ended it is completed (at least one image was made), failed (none
was made and at least one failed) or cancelled (every image was cancelled).
"""

from __future__ import annotations

import json
import secrets
import uuid
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

from sqlite_utils import Database

from .accounts import change_credits
from .config import LimitsConfig
from .db import immediate, utc_now
from .errors import BadRequest, NotFound

QUEUED, RUNNING, COMPLETED, FAILED = "queued", "running", "completed", "failed"
CANCELLED = "cancelled"
PROCESSING = "processing"  # a job some of whose images have started
MAX_SEED = 2**32 - 1


@dataclass(frozen=True)
class GenerationSettings:
    """What every image in one pipeline call must share: equal settings batch together."""

    width: int
    height: int
    steps: int
    guidance_scale: float
    # None: the pipeline's own empty unconditional prompt. A default, so the
    # settings of jobs stored before it existed still load.
    negative_prompt: str | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "GenerationSettings":
        return cls(**json.loads(text))


@dataclass(frozen=True)
class QueuedImage:
    image_id: int
    job_id: str
    account_id: int
    index: int
    prompt: str
    seed: int
    settings: GenerationSettings


@dataclass(frozen=True)
class Submitted:
    job_id: str
    total_images: int
    credits_used: int
    credits: int
    images: list[QueuedImage]
    # True when this is the first answer to an Idempotency-Key again: nothing
    # was charged or queued this time (see admission.py).
    replayed: bool = False


@dataclass(frozen=True)
class ImageView:
    index: int
    prompt: str
    status: str
    seed: int
    error: str | None
    finished_at: str | None


@dataclass(frozen=True)
class JobView:
    job_id: str
    status: str
    total_images: int
    queued_images: int
    running_images: int
    completed_images: int
    failed_images: int
    credits_used: int
    credits_refunded: int
    created_at: str
    started_at: str | None
    finished_at: str | None
    settings: GenerationSettings
    images: list[ImageView]
    cancelled_images: int = 0
    seed: int | None = None  # the base seed asked for, None when each image drew its own


def check_prompts(prompts: list[str], limits: LimitsConfig) -> list[str]:
    if not prompts:
        raise BadRequest("'prompts' is empty: give at least one prompt")
    if len(prompts) > limits.max_prompts_per_request:
        raise BadRequest(
            f"'prompts' has {len(prompts)} prompts; at most"
            f" {limits.max_prompts_per_request} are allowed per request"
        )
    for i, prompt in enumerate(prompts):
        if not prompt.strip():
            raise BadRequest(f"prompts[{i}] is empty")
        if len(prompt) > limits.max_prompt_length:
            raise BadRequest(
                f"prompts[{i}] is {len(prompt)} characters long; the limit is"
                f" {limits.max_prompt_length}"
            )
    return prompts


def submit(
    db: Database,
    account_id: int,
    api_key_id: int | None,
    prompts: list[str],
    settings: GenerationSettings,
    seed: int | None = None,
) -> Submitted:
    """Charges one credit an image and writes the job, all in one transaction.

    The caller reserves queue room first and enqueues `images` afterwards;
    if this raises, nothing was charged or written.
    """
    job_id = str(uuid.uuid4())
    now = utc_now()
    count = len(prompts)
    seeds = image_seeds(count, seed)
    with immediate(db):
        # The job row first: the ledger row refers to it.
        db.execute(
            "INSERT INTO jobs (id, account_id, api_key_id, status, total_images, credits_used,"
            " settings, seed, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [job_id, account_id, api_key_id, QUEUED, count, count, settings.to_json(), seed, now],
        )
        balance = change_credits(db, account_id, -count, "image job", job_id)
        image_ids = [
            db.execute(
                "INSERT INTO job_images (job_id, idx, prompt, seed, status) VALUES (?, ?, ?, ?, ?)",
                [job_id, i, prompt, seed, QUEUED],
            ).lastrowid
            for i, (prompt, seed) in enumerate(zip(prompts, seeds))
        ]
    images = [
        QueuedImage(image_id, job_id, account_id, i, prompt, seed, settings)
        for i, (image_id, prompt, seed) in enumerate(zip(image_ids, prompts, seeds))
    ]
    return Submitted(job_id, count, count, balance, images)


def image_seeds(count: int, base_seed: int | None) -> list[int]:
    """Image i gets base_seed + i, wrapping past MAX_SEED to 0; without a base, random seeds."""
    if base_seed is None:
        return [secrets.randbelow(MAX_SEED + 1) for _ in range(count)]
    return [(base_seed + i) % (MAX_SEED + 1) for i in range(count)]


def _job_row(db: Database, account_id: int, job_id: str) -> dict:
    rows = list(db.query("SELECT * FROM jobs WHERE id = ? AND account_id = ?", [job_id, account_id]))
    if not rows:
        # Another account's job is answered exactly like one that does not exist.
        raise NotFound("Job not found")
    return rows[0]


def get_job(db: Database, account_id: int, job_id: str) -> JobView:
    job = _job_row(db, account_id, job_id)
    images = [
        ImageView(r["idx"], r["prompt"], r["status"], r["seed"], r["error"], r["finished_at"])
        for r in db.query(
            "SELECT idx, prompt, status, seed, error, finished_at FROM job_images"
            " WHERE job_id = ? ORDER BY idx",
            [job_id],
        )
    ]
    counts = defaultdict(int)
    for image in images:
        counts[image.status] += 1
    return JobView(
        job_id=job["id"],
        status=job["status"],
        total_images=job["total_images"],
        queued_images=counts[QUEUED],
        running_images=counts[RUNNING],
        completed_images=counts[COMPLETED],
        failed_images=counts[FAILED],
        credits_used=job["credits_used"],
        credits_refunded=job["credits_refunded"],
        created_at=job["created_at"],
        started_at=job["started_at"],
        finished_at=job["finished_at"],
        settings=GenerationSettings.from_json(job["settings"]),
        images=images,
        cancelled_images=counts[CANCELLED],
        seed=job["seed"],
    )


def image_file(db: Database, images_dir: Path, account_id: int, job_id: str, index: int) -> Path:
    _job_row(db, account_id, job_id)
    row = db.execute(
        "SELECT file FROM job_images WHERE job_id = ? AND idx = ? AND status = ?",
        [job_id, index, COMPLETED],
    ).fetchone()
    if row is None or not row[0]:
        raise NotFound(f"image {index} of this job is not ready")
    return images_dir / row[0]


def image_relpath(job_id: str, index: int) -> str:
    return f"{job_id}/{index}.png"


def mark_running(db: Database, images: Iterable[QueuedImage]) -> list[QueuedImage]:
    """Starts the images still queued; returns those (others were cancelled or ended)."""
    images = list(images)
    now = utc_now()
    with immediate(db):
        started = [
            image for image in images
            if db.execute("UPDATE job_images SET status = ?, started_at = ? WHERE id = ? AND status = ?",
                          [RUNNING, now, image.image_id, QUEUED]).rowcount
        ]
        db.conn.executemany(
            "UPDATE jobs SET status = ?, started_at = COALESCE(started_at, ?) WHERE id = ?",
            [(PROCESSING, now, job_id) for job_id in {image.job_id for image in started}],
        )
    return started


def mark_completed(db: Database, images: Iterable[QueuedImage]) -> None:
    images = list(images)
    now = utc_now()
    with immediate(db):
        db.conn.executemany(
            "UPDATE job_images SET status = ?, file = ?, finished_at = ? WHERE id = ?",
            [(COMPLETED, image_relpath(i.job_id, i.index), now, i.image_id) for i in images],
        )
        _settle_jobs(db, {i.job_id for i in images}, now)


def mark_failed(db: Database, images: Iterable[QueuedImage], error: str) -> None:
    """Fails the images and refunds each one's credit through the ledger."""
    images = list(images)
    now = utc_now()
    with immediate(db):
        per_job: dict[tuple[str, int], int] = defaultdict(int)
        for image in images:
            changed = db.execute(
                "UPDATE job_images SET status = ?, error = ?, finished_at = ?"
                " WHERE id = ? AND status IN (?, ?)",
                [FAILED, error, now, image.image_id, QUEUED, RUNNING],
            ).rowcount
            # Only an image that was still owed is refunded, so a retry of
            # this call can never refund twice.
            if changed:
                per_job[(image.job_id, image.account_id)] += 1
        for (job_id, account_id), count in per_job.items():
            db.execute("UPDATE jobs SET credits_refunded = credits_refunded + ? WHERE id = ?",
                       [count, job_id])
            change_credits(db, account_id, count, "refund: image failed", job_id)
        _settle_jobs(db, {i.job_id for i in images}, now)


def cancel(db: Database, account_id: int, job_id: str) -> int:
    """Cancels the job's images not yet started and refunds them; returns how many.

    Images already running finish and stay paid for. Safe to repeat: a second
    call finds nothing queued and refunds nothing.
    """
    now = utc_now()
    with immediate(db):
        _job_row(db, account_id, job_id)
        # The worker starts an image only while it is still queued (mark_running),
        # so an image cancelled here is never generated, even if already dequeued.
        count = db.execute(
            "UPDATE job_images SET status = ?, finished_at = ? WHERE job_id = ? AND status = ?",
            [CANCELLED, now, job_id, QUEUED],
        ).rowcount
        if count:
            db.execute("UPDATE jobs SET credits_refunded = credits_refunded + ? WHERE id = ?",
                       [count, job_id])
            change_credits(db, account_id, count, "refund: image cancelled", job_id)
            _settle_jobs(db, {job_id}, now)
    return count


def _settle_jobs(db: Database, job_ids: set[str], now: str) -> None:
    """Gives jobs whose images have all ended their final status (see the module's text)."""
    for job_id in job_ids:
        open_count, completed, failed = db.execute(
            "SELECT SUM(status IN (?, ?)), SUM(status = ?), SUM(status = ?)"
            " FROM job_images WHERE job_id = ?",
            [QUEUED, RUNNING, COMPLETED, FAILED, job_id],
        ).fetchone()
        if open_count == 0:
            status = COMPLETED if completed else FAILED if failed else CANCELLED
            db.execute("UPDATE jobs SET status = ?, finished_at = ? WHERE id = ?",
                       [status, now, job_id])


def unfinished_images(db: Database) -> list[QueuedImage]:
    """Images accepted but not finished when the process last stopped, oldest first.

    Running ones go back to queued: their PNG may be half-written, and
    generating again from the stored seed gives the same picture.
    """
    with immediate(db):
        db.execute("UPDATE job_images SET status = ?, started_at = NULL WHERE status = ?",
                   [QUEUED, RUNNING])
        rows = list(
            db.query(
                "SELECT i.id, i.job_id, j.account_id, i.idx, i.prompt, i.seed, j.settings"
                " FROM job_images i JOIN jobs j ON j.id = i.job_id"
                " WHERE i.status = ? ORDER BY j.created_at, i.job_id, i.idx",
                [QUEUED],
            )
        )
    return [
        QueuedImage(r["id"], r["job_id"], r["account_id"], r["idx"], r["prompt"], r["seed"],
                    GenerationSettings.from_json(r["settings"]))
        for r in rows
    ]


@dataclass(frozen=True)
class JobSummary:
    """A job as the console lists it: counts and its images, without settings."""

    job_id: str
    status: str
    total_images: int
    completed_images: int
    credits_used: int
    credits_refunded: int
    created_at: str
    finished_at: str | None
    images: list[ImageView]


def list_jobs(db: Database, account_id: int, limit: int = 20, offset: int = 0) -> list[JobSummary]:
    """The account's jobs, newest first."""
    rows = list(db.query(
        "SELECT * FROM jobs WHERE account_id = ? ORDER BY created_at DESC, id LIMIT ? OFFSET ?",
        [account_id, limit, offset]))
    images: dict[str, list[ImageView]] = defaultdict(list)
    if rows:
        marks = ", ".join("?" for _ in rows)
        for r in db.query(
            "SELECT job_id, idx, prompt, status, seed, error, finished_at FROM job_images"
            f" WHERE job_id IN ({marks}) ORDER BY job_id, idx",
            [row["id"] for row in rows],
        ):
            images[r["job_id"]].append(ImageView(r["idx"], r["prompt"], r["status"], r["seed"],
                                                 r["error"], r["finished_at"]))
    return [
        JobSummary(
            job_id=row["id"],
            status=row["status"],
            total_images=row["total_images"],
            completed_images=sum(i.status == COMPLETED for i in images[row["id"]]),
            credits_used=row["credits_used"],
            credits_refunded=row["credits_refunded"],
            created_at=row["created_at"],
            finished_at=row["finished_at"],
            images=images[row["id"]],
        )
        for row in rows
    ]


def count_jobs(db: Database, account_id: int) -> int:
    return db.execute("SELECT COUNT(*) FROM jobs WHERE account_id = ?", [account_id]).fetchone()[0]
