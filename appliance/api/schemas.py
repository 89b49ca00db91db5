"""The JSON shapes of the API, kept apart from storage. Field names are camelCase."""

from __future__ import annotations

from typing import Literal

import msgspec


class ErrorBody(msgspec.Struct):
    error: str


class CreateImagesRequest(msgspec.Struct, forbid_unknown_fields=True):
    prompts: list[str]


class CreateImagesResponse(msgspec.Struct, rename="camel"):
    job_id: str
    total_images: int
    credits_used: int
    credits: int


ImageStatus = Literal["queued", "running", "completed", "failed"]
JobStatus = Literal["queued", "processing", "completed", "failed"]


class JobImage(msgspec.Struct, rename="camel", omit_defaults=True):
    index: int
    prompt: str
    status: ImageStatus
    seed: int
    url: str | None = None
    error: str | None = None
    finished_at: str | None = None


class JobResponse(msgspec.Struct, rename="camel"):
    job_id: str
    status: JobStatus
    total_images: int
    completed_images: int
    failed_images: int
    pending_images: int
    credits_used: int
    credits_refunded: int
    created_at: str
    started_at: str | None
    finished_at: str | None
    images: list[JobImage]
