"""Bulk image jobs: submit, read, follow live, cancel, and the PNGs they make."""

from __future__ import annotations

from typing import Annotated, Any

import anyio.to_thread
from litestar import Controller, Request, delete, get, post
from litestar.openapi.spec import OpenAPIType
from litestar.params import FromPath, JSONBody, Parameter
from litestar.response import Response, ServerSentEvent
from litestar.response.base import ASGIResponse

from appliance.accounts.keys import KeyOwner
from appliance.core.cached_reads import read_if_cached
from appliance.core.errors import NotFound
from appliance.core.numbers import LARGEST_INTEGER, row_id
from appliance.jobs import parameters
from appliance.jobs.models import JobView
from appliance.jobs.service import JobRequest
from appliance.web.api import progress
from appliance.web.api.bodies import StrictJSONRequest
from appliance.web.api.documentation import BEARER, success_response
from appliance.web.api.documentation import error_responses as documented
from appliance.web.api.idempotent import IdempotentOperation
from appliance.web.api.idempotent import from_request as idempotent_request
from appliance.web.api.schemas import (
    CreateImagesRequest,
    CreateImagesResponse,
    ErrorBody,
    JobResponse,
)
from appliance.web.api.views import api_image_url, job_response, json_answer
from appliance.web.dependencies import Jobs, Models, Settings, Stopping

# How the native API names each generation parameter in its errors.
CAMEL_NAMES = {"width": "width", "height": "height", "steps": "steps",
               "guidance_scale": "guidanceScale", "negative_prompt": "negativePrompt"}

ERROR_MEANINGS = {
    400: "The body is not valid; `error` says what is wrong. Nothing is charged.",
    401: "Missing or invalid Authorization header / More than one Authorization header /"
         " Invalid API key format / Invalid API key.",
    402: "Insufficient credits: the account cannot pay for every image of the request.",
    404: "No such job for this account (another account's job is answered the same).",
    413: "The request body is larger than limits.max_request_bytes. Nothing is charged.",
    415: "The body is not sent as JSON (Content-Type: application/json). Nothing is charged.",
    422: "The Idempotency-Key was used before with a different request. Nothing is charged.",
    429: "Too many requests with this key (limits.requests_per_minute_per_key), or too many"
         " of the account's images still pending; retry after `Retry-After` seconds."
         " Nothing is charged.",
    503: "The queue cannot take the whole job now, or the database is busy or its disk"
         " full; retry after `Retry-After` seconds. Nothing is charged.",
}


PNG = "image/png"

# How the OpenAPI document shows an image's index, which the route reads as text.
INDEX_SCHEMA = {"type": OpenAPIType.INTEGER, "minimum": 0, "maximum": LARGEST_INTEGER,
                "description": "The image's place in the job, from 0."}


def error_responses(*codes: int) -> dict[int, Any]:
    return documented(ErrorBody, ERROR_MEANINGS, *codes)


class ImagesController(Controller):
    path = "/api/playground/images"
    tags = ["Images"]
    security = BEARER
    request_class = StrictJSONRequest

    @post(
        "/",
        status_code=200,
        sync_to_thread=True,
        summary="Generate images from text prompts",
        description="Each image costs its model's price (1 credit unless config.toml says"
                    " otherwise; GET /api/models), deducted for the whole request before it is"
                    " queued. Only `prompts` is required; the generation parameters default to"
                    " the model's and a value outside config.toml's bounds is refused"
                    " with 400 naming the field and the allowed range, as is an unknown model"
                    " or an adapter that does not fit it.",
        responses=error_responses(400, 401, 402, 413, 415, 422, 429, 503),
        operation_class=IdempotentOperation,
    )
    def create(self, request: Request[KeyOwner, Any, Any], data: JSONBody[CreateImagesRequest],
               jobs: Jobs, config: Settings, catalog: Models) -> Response[CreateImagesResponse]:
        prompts = parameters.check_prompts(data.prompts, config.limits)
        model = catalog.model(data.model)
        loras = parameters.check_loras(
            catalog, model, [(lora.name, lora.scale) for lora in data.loras or ()], "loras")
        settings = parameters.settings_for(
            config.generation, config.limits, CAMEL_NAMES, model, loras=loras,
            negative_prompt=data.negative_prompt, width=data.width, height=data.height,
            steps=data.steps, guidance_scale=data.guidance_scale)
        seed = None if data.seed is None else parameters.check_seed("seed", data.seed)
        submitted = jobs.submit(JobRequest(request.user.account_id, request.user.key_id, prompts,
                                           settings, seed, idempotent_request(request, data),
                                           model.credits_per_image))
        return Response(
            CreateImagesResponse(
                job_id=submitted.job_id,
                total_images=submitted.total_images,
                credits_used=submitted.credits_used,
                credits=submitted.credits,
            ),
            headers={"Idempotent-Replayed": "true"} if submitted.replayed else None,
        )

    # The reads below run on the event loop: a few indexed SELECTs, which in WAL
    # mode never wait for a writer, cost less than the hop to a worker thread.
    # They are what clients send most (a status poll, a download), so each hands
    # back its answer ready to send: a Response would be converted into one.
    @get(
        "/{job_id:str}",
        sync_to_thread=False,
        summary="Get a job's status and its images",
        responses={**success_response(JobResponse), **error_responses(401, 404, 429, 503)},
    )
    def read(self, request: Request[KeyOwner, Any, Any], job_id: FromPath[str],
             jobs: Jobs) -> ASGIResponse:
        job = jobs.read(request.user.account_id, job_id)
        return json_answer(job_response(job, api_image_url(request)))

    @delete(
        "/{job_id:str}",
        status_code=200,
        sync_to_thread=True,
        summary="Cancel the images of a job that have not started",
        description="Images not yet started become `cancelled` and their credits are refunded"
                    " through the ledger; images already running finish and stay paid for."
                    " Answers the job as it stands after the cancel. Repeating it, or"
                    " cancelling a finished job, changes nothing.",
        responses=error_responses(401, 404, 429, 503),
    )
    def cancel(self, request: Request[KeyOwner, Any, Any], job_id: FromPath[str],
               jobs: Jobs) -> JobResponse:
        jobs.cancel(request.user.account_id, job_id)
        return job_response(jobs.read(request.user.account_id, job_id), api_image_url(request))

    @get(
        "/{job_id:str}/events",
        summary="Follow a job live, as server-sent events",
        description=progress.DESCRIPTION,
        media_type="text/event-stream",
        responses=error_responses(401, 404, 429, 503),
    )
    async def events(self, request: Request[KeyOwner, Any, Any], job_id: FromPath[str],
                     jobs: Jobs, stopping: Stopping) -> ServerSentEvent:
        account_id = request.user.account_id

        def read_job() -> JobView:
            return jobs.read(account_id, job_id)

        # Read once before streaming, so an unknown job is a plain 404.
        first = await anyio.to_thread.run_sync(read_job)
        return ServerSentEvent(progress.job_events(first, read_job, api_image_url(request),
                                                   stopping))

    # The index is read as text and parsed here: a route's `int` takes what
    # Python's int() takes ("٣", "1_0") and any size, which SQLite cannot bind.
    @get(
        "/{job_id:str}/images/{index:str}",
        name="job_image",
        summary="Download one finished image as PNG",
        media_type=PNG,
        responses={**success_response(bytes, PNG), **error_responses(401, 404, 429, 503)},
    )
    async def image(self, request: Request[KeyOwner, Any, Any], job_id: FromPath[str],
                    index: Annotated[str, Parameter(schema_extra=INDEX_SCHEMA)],
                    jobs: Jobs) -> ASGIResponse:
        number = row_id(index)
        if number is None:
            raise NotFound(f"image {index[:40]!r} of this job does not exist")
        path = jobs.image_path(request.user.account_id, job_id, number)
        # Read here when its pages are in memory (usually: it was written lately),
        # else in one read on a worker thread: a PNG is at most a few megabytes,
        # and streaming it in chunks costs a thread hop per chunk and per stat.
        png = read_if_cached(path) if jobs.images_on_local_disk else None
        if png is None:
            png = await anyio.Path(path).read_bytes()
        return ASGIResponse(body=png, media_type=PNG, headers={
            "Content-Disposition": f'inline; filename="{job_id}-{number}.png"'})
