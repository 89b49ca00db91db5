"""POST and GET of bulk image jobs, and the PNGs they make."""

from __future__ import annotations

from typing import Any

from litestar import Controller, Request, get, post
from litestar.openapi.spec import SecurityRequirement
from litestar.params import FromPath, JSONBody
from litestar.openapi.datastructures import ResponseSpec
from litestar.response import File

from .. import jobs
from ..keys import KeyOwner
from .schemas import (CreateImagesRequest, CreateImagesResponse, ErrorBody, JobImage,
                      JobResponse)

BEARER: list[SecurityRequirement] = [{"apiKey": []}]


def error_responses(*codes: int) -> dict[int, ResponseSpec]:
    meaning = {
        400: "The body is not valid; `error` says what is wrong. Nothing is charged.",
        401: "Missing or invalid Authorization header / Invalid API key format / Invalid API key.",
        402: "Insufficient credits: the account cannot pay for every image of the request.",
        404: "No such job for this account (another account's job is answered the same).",
        503: "The queue cannot take the whole job now; retry after `Retry-After` seconds."
             " Nothing is charged.",
    }
    return {code: ResponseSpec(data_container=ErrorBody, description=meaning[code])
            for code in codes}


class ImagesController(Controller):
    path = "/api/playground/images"
    tags = ["Images"]
    security = BEARER

    @post(
        "/",
        status_code=200,
        sync_to_thread=True,
        summary="Generate images from text prompts",
        description="Each image costs 1 credit, deducted for the whole request before it is queued.",
        responses=error_responses(400, 401, 402, 503),
    )
    def create(self, request: Request[KeyOwner, Any, Any], data: JSONBody[CreateImagesRequest]) -> CreateImagesResponse:
        state = request.app.state
        prompts = jobs.check_prompts(data.prompts, state.config.limits)
        queue = state.engine.queue
        queue.reserve(len(prompts))
        try:
            submitted = jobs.submit(state.store.db(), request.user.account_id, request.user.key_id,
                                    prompts, state.default_settings)
        except BaseException:
            queue.release(len(prompts))
            raise
        queue.put_reserved(submitted.images)
        return CreateImagesResponse(
            job_id=submitted.job_id,
            total_images=submitted.total_images,
            credits_used=submitted.credits_used,
            credits=submitted.credits,
        )

    @get(
        "/{job_id:str}",
        sync_to_thread=True,
        summary="Get a job's status and its images",
        responses=error_responses(401, 404),
    )
    def read(self, request: Request[KeyOwner, Any, Any], job_id: FromPath[str]) -> JobResponse:
        job = jobs.get_job(request.app.state.store.db(), request.user.account_id, job_id)
        return JobResponse(
            job_id=job.job_id,
            status=job.status,
            total_images=job.total_images,
            completed_images=job.completed_images,
            failed_images=job.failed_images,
            pending_images=job.queued_images + job.running_images,
            credits_used=job.credits_used,
            credits_refunded=job.credits_refunded,
            created_at=job.created_at,
            started_at=job.started_at,
            finished_at=job.finished_at,
            images=[
                JobImage(
                    index=image.index,
                    prompt=image.prompt,
                    status=image.status,
                    seed=image.seed,
                    url=(request.url_for("job_image", job_id=job.job_id, index=image.index)
                         if image.status == jobs.COMPLETED else None),
                    error=image.error,
                    finished_at=image.finished_at,
                )
                for image in job.images
            ],
        )

    @get(
        "/{job_id:str}/images/{index:int}",
        name="job_image",
        sync_to_thread=True,
        summary="Download one finished image as PNG",
        media_type="image/png",
        responses=error_responses(401, 404),
    )
    def image(self, request: Request[KeyOwner, Any, Any], job_id: FromPath[str],
              index: FromPath[int]) -> File:
        state = request.app.state
        path = jobs.image_file(state.store.db(), state.config.images_dir,
                               request.user.account_id, job_id, index)
        return File(path, media_type="image/png", filename=f"{job_id}-{index}.png",
                    content_disposition_type="inline")
