"""Jobs as the API shows them to their owner."""

from __future__ import annotations

from litestar import Request
from litestar.datastructures import State

from appliance.jobs.models import ImageStatus, ImageView, JobView
from appliance.web.api.schemas import JobImage, JobParameters, JobResponse


def queue_position(state: State, job: JobView) -> int | None:
    # A cancelled image waits in the queue until the worker skips it; only
    # images still queued make a position.
    return state.engine.queue.position(job.job_id) if job.queued_images else None


def image_response(request: Request, job_id: str, image: ImageView) -> JobImage:
    return JobImage(
        index=image.index,
        prompt=image.prompt,
        status=image.status,
        seed=image.seed,
        url=(request.url_for("job_image", job_id=job_id, index=image.index)
             if image.status == ImageStatus.COMPLETED else None),
        error=image.error,
        finished_at=image.finished_at,
    )


def job_response(request: Request, job: JobView) -> JobResponse:
    settings = job.settings
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
        images=[image_response(request, job.job_id, image) for image in job.images],
        cancelled_images=job.cancelled_images,
        queue_position=queue_position(request.app.state, job),
        parameters=JobParameters(
            negative_prompt=settings.negative_prompt,
            width=settings.width,
            height=settings.height,
            steps=settings.steps,
            guidance_scale=settings.guidance_scale,
            seed=job.seed,
        ),
    )
