"""What a job and its images are: statuses, settings and the views services hand out.

An image moves queued -> running -> completed | failed, or queued -> cancelled
when its owner cancels it before it starts. A job is queued until one of its
images starts, then processing; once every image has ended it is completed
(at least one image was made), failed (none was made and at least one
failed) or cancelled (every image was cancelled).
"""

from __future__ import annotations

import functools
import json
from dataclasses import asdict, dataclass
from datetime import date
from enum import StrEnum

MAX_SEED = 2**32 - 1


class ImageStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in _FINISHED_IMAGE

    @property
    def made(self) -> bool:
        """Its PNG is on disk, for its owner to fetch."""
        return self is ImageStatus.COMPLETED


class JobStatus(StrEnum):
    QUEUED = "queued"
    PROCESSING = "processing"  # some of its images have started
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in _FINISHED_JOB


_FINISHED_IMAGE = frozenset({ImageStatus.COMPLETED, ImageStatus.FAILED, ImageStatus.CANCELLED})
_FINISHED_JOB = frozenset({JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED})
# The statuses an image has while its owner still waits for it, as SQL sees them.
PENDING_IMAGE_STATUSES = (ImageStatus.QUEUED, ImageStatus.RUNNING)


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
    # The installed model's name; "" in jobs stored before there were several,
    # which the default model makes.
    model: str = ""
    # LoRA adapters applied, as (name, scale), sorted by name so that equal sets
    # batch together.
    loras: tuple[tuple[str, float], ...] = ()

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    # Frozen, so one parsed copy serves every read of the same text: every status
    # poll parses its job's settings.
    @functools.lru_cache(maxsize=1024)
    def from_json(cls, text: str) -> GenerationSettings:
        values = json.loads(text)
        values["loras"] = tuple((name, float(scale)) for name, scale in values.get("loras", ()))
        return cls(**values)


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
    status: ImageStatus
    seed: int
    error: str | None
    finished_at: str | None


@dataclass(frozen=True)
class JobView:
    job_id: str
    status: JobStatus
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
    # Queued images the engine takes before this job's next one; None when
    # none of its images waits (filled in by the job service from the queue).
    queue_position: int | None = None
    credits_per_image: int = 1


@dataclass(frozen=True)
class JobSummary:
    """A job as the console lists it: counts and its images, without settings."""

    job_id: str
    status: JobStatus
    total_images: int
    completed_images: int
    credits_used: int
    credits_refunded: int
    created_at: str
    finished_at: str | None
    images: list[ImageView]


@dataclass(frozen=True)
class GalleryFilter:
    """Which made images the gallery shows; None matches any."""

    job_id: str | None = None
    key_id: int | None = None
    since: date | None = None  # the first UTC day an image was made on
    until: date | None = None  # the last one, inclusive


@dataclass(frozen=True)
class GalleryImage:
    """A made image with what the gallery's large view tells about it."""

    job_id: str
    index: int
    prompt: str
    seed: int
    settings: GenerationSettings
    made_at: str
    key_name: str | None  # None for the playground, where the account itself asked


@dataclass(frozen=True)
class GalleryPage:
    images: list[GalleryImage]
    total: int  # every image the filter matches, on all pages


@dataclass(frozen=True)
class KeyChoice:
    """One of an account's API keys, as the gallery's filter offers it."""

    id: int
    name: str
    prefix: str
    deleted: bool
