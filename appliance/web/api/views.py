"""Jobs as the API (and the console's live pages) show them to their owner."""

from __future__ import annotations

from collections.abc import Callable

import msgspec
from litestar import Litestar, Request
from litestar.enums import MediaType
from litestar.response.base import ASGIResponse

from appliance.jobs.models import ImageView, JobView
from appliance.web.api.limits import absolute_url
from appliance.web.api.schemas import JobImage, JobParameters, JobResponse, LoraChoice

# (job id, image index) -> where the owner fetches that image's PNG
ImageUrl = Callable[[str, int], str]


IMAGE_PATH_STATE = "appliance.image_path"


def image_path_template(app: Litestar) -> str:
    """The image route's path with `{job_id}` and `{index}` to fill in.

    Reversed once per app: route_reverse costs tens of microseconds, and a status
    poll would pay it for every image of the job.
    """
    template = app.state.get(IMAGE_PATH_STATE)
    if template is None:
        template = app.route_reverse("job_image", job_id="{job_id}", index="{index}")
        app.state[IMAGE_PATH_STATE] = template
    return str(template)


def api_image_url(request: Request) -> ImageUrl:
    template = image_path_template(request.app)

    def url(job_id: str, index: int) -> str:
        return absolute_url(request, template.format(job_id=job_id, index=index))

    return url


def json_answer(body: msgspec.Struct) -> ASGIResponse:
    """`body` as a 200 JSON answer, ready to send."""
    return ASGIResponse(body=msgspec.json.encode(body), media_type=MediaType.JSON)


def image_response(job_id: str, image: ImageView, image_url: ImageUrl) -> JobImage:
    return JobImage(
        index=image.index,
        prompt=image.prompt,
        status=image.status,
        seed=image.seed,
        url=image_url(job_id, image.index) if image.status.made else None,
        error=image.error,
        finished_at=image.finished_at,
    )


def job_response(job: JobView, image_url: ImageUrl) -> JobResponse:
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
        images=[image_response(job.job_id, image, image_url) for image in job.images],
        cancelled_images=job.cancelled_images,
        queue_position=job.queue_position,
        parameters=JobParameters(
            negative_prompt=settings.negative_prompt,
            width=settings.width,
            height=settings.height,
            steps=settings.steps,
            guidance_scale=settings.guidance_scale,
            seed=job.seed,
            model=settings.model or None,
            loras=[LoraChoice(name, scale) for name, scale in settings.loras],
            credits_per_image=job.credits_per_image,
        ),
    )
