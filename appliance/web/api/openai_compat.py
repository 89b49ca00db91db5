"""An OpenAI-compatible images API under /v1, for the client libraries people already use.

Same keys, same credits and the same queue as the native API: a request here
is a job of `n` copies of one prompt, and the answer waits for its images.
Errors use OpenAI's shape, {"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
from litestar import Controller, Request, Response, get, post
from litestar.exceptions import HTTPException, ValidationException
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import JSONBody

from appliance.accounts.keys import KeyOwner
from appliance.core.config import Config
from appliance.core.database import DatabaseError
from appliance.core.errors import ApplianceError
from appliance.jobs import parameters
from appliance.jobs.catalog import Catalog, InstalledModel
from appliance.jobs.models import GenerationSettings, ImageStatus, JobView
from appliance.jobs.service import JobRequest, JobService
from appliance.web.api.bodies import StrictJSONRequest
from appliance.web.api.documentation import BEARER
from appliance.web.api.documentation import error_responses as documented
from appliance.web.api.errors import (
    body_problem,
    database_error,
    guarded,
    http_error,
    os_error,
    unexpected_error,
)
from appliance.web.api.schemas import (
    OpenAIError,
    OpenAIErrorBody,
    OpenAIImage,
    OpenAIImageRequest,
    OpenAIImagesResponse,
    OpenAIModel,
    OpenAIModelList,
)
from appliance.web.api.views import api_image_url
from appliance.web.dependencies import Jobs, Models, Settings

PREFIX = "/v1"
POLL_SECONDS = 0.1
SNAKE_NAMES = {"width": "size", "height": "size", "steps": "steps",
               "guidance_scale": "guidance_scale", "negative_prompt": "negative_prompt"}

# OpenAI's error `type` and `code` for each status this API answers.
ERROR_KINDS: dict[int, tuple[str, str | None]] = {
    400: ("invalid_request_error", None),
    401: ("invalid_request_error", "invalid_api_key"),
    402: ("insufficient_quota", "insufficient_quota"),
    404: ("invalid_request_error", "not_found"),
    405: ("invalid_request_error", "method_not_allowed"),
    413: ("invalid_request_error", "request_too_large"),
    415: ("invalid_request_error", "unsupported_media_type"),
    429: ("requests", "rate_limit_exceeded"),
    503: ("server_error", "queue_full"),
    504: ("timeout", "timeout"),
}


class ImagesTimedOut(ApplianceError):
    status = 504

    def __init__(self, message: str):
        # The OpenAI clients retry a 5xx by themselves; a retry would only queue
        # the same images again behind the ones that were too slow.
        super().__init__(message, headers={"x-should-retry": "false"})


class NoImageMade(ApplianceError):
    status = 500


def _error(message: str, status: int, param: str | None = None,
           headers: dict[str, str] | None = None) -> Response[OpenAIErrorBody]:
    kind, code = ERROR_KINDS.get(status, ("server_error" if status >= 500
                                          else "invalid_request_error", None))
    body = OpenAIErrorBody(OpenAIError(message=message, type=kind, param=param, code=code))
    return Response(body, status_code=status, headers=headers or {})


def _appliance_error(request: Request, exc: ApplianceError) -> Response[Any]:
    return _error(exc.message, exc.status, getattr(exc, "param", None), exc.headers)


def _validation_error(request: Request, exc: ValidationException) -> Response[Any]:
    extra = exc.extra if isinstance(exc.extra, list) else []
    problem = next((e for e in extra if isinstance(e, dict)), {})
    key = str(problem.get("key", ""))
    message = body_problem(str(problem.get("message", exc.detail)), key)
    param = key.partition("[")[0] if key and key != "data" else None
    return _error(message, 400, param)


def _http_error(request: Request, exc: HTTPException) -> Response[Any]:
    native = http_error(request, exc)
    return _error(native.content["error"], exc.status_code, headers=exc.headers)


def _unexpected_error(request: Request, exc: Exception) -> Response[Any]:
    unexpected_error(request, exc)  # logs it
    return _error("Internal server error", 500)


def _in_openai_shape(native_handler: Callable[[Request, Any], Response[Any]]) -> Callable:
    # A busy or full database (503 with Retry-After) answers as on the native API.
    def handle(request: Request, exc: Exception) -> Response[Any]:
        native = native_handler(request, exc)
        return _error(native.content["error"], native.status_code or 500,
                      headers=dict(native.headers))

    return handle


OPENAI_HANDLERS: dict[type[Exception], Callable[[Request, Any], Response[Any]]] = {
    ApplianceError: _appliance_error,
    ValidationException: _validation_error,
    HTTPException: _http_error,
    **dict.fromkeys(DatabaseError, _in_openai_shape(database_error)),
    OSError: _in_openai_shape(os_error),
    Exception: _unexpected_error,
}


def openai_errors_on_v1(handlers: dict) -> dict:
    """The app's exception handlers, answering in OpenAI's shape for paths under /v1.

    At the app level rather than on the /v1 router, so that an unknown path or
    method under /v1, which no route of the router sees, answers in the same shape.
    """
    def under_v1(native: Callable) -> Callable:
        def handle(request: Request, exc: Exception) -> Response[Any]:
            path = request.scope.get("path", "")
            if path == PREFIX or path.startswith(PREFIX + "/"):
                openai = next(OPENAI_HANDLERS[cls] for cls in type(exc).__mro__
                              if cls in OPENAI_HANDLERS)
                return openai(request, exc)
            return native(request, exc)

        return handle

    # Keys may be exception types or status codes; the exception picks the shape.
    return {key: guarded(under_v1(native)) for key, native in handlers.items()}


ERROR_MEANINGS = {
    400: "A parameter is not valid; `error.param` names it. Nothing is charged.",
    401: "Missing or invalid Authorization header / More than one Authorization header /"
         " Invalid API key format / Invalid API key.",
    402: "Insufficient credits (code insufficient_quota).",
    413: "The request body is larger than limits.max_request_bytes. Nothing is charged.",
    415: "The body is not sent as JSON (Content-Type: application/json). Nothing is charged.",
    500: "No image could be made; the credits were refunded.",
    503: "The queue cannot take the images now; retry after `Retry-After` seconds.",
    504: "The images were not ready within the configured wait (openai.wait_timeout);"
         " those not started were cancelled and refunded.",
}


def error_responses(*codes: int) -> dict[int, ResponseSpec]:
    return documented(OpenAIErrorBody, ERROR_MEANINGS, *codes)


def _check_request(data: OpenAIImageRequest, config: Config, catalog: Catalog
                   ) -> tuple[list[str], GenerationSettings, int | None, InstalledModel]:
    model = catalog.model(data.model)
    limits = config.limits
    n = 1 if data.n is None else data.n
    if not 1 <= n <= limits.max_prompts_per_request:
        raise parameters.InvalidParameter(
            "n", f"'n' is {n}; it must be from 1 to {limits.max_prompts_per_request}")
    if not data.prompt.strip():
        raise parameters.InvalidParameter("prompt", "'prompt' is empty")
    if len(data.prompt) > limits.max_prompt_length:
        raise parameters.InvalidParameter(
            "prompt", f"'prompt' is {len(data.prompt)} characters long; the limit is"
                      f" {limits.max_prompt_length}")
    width = height = None
    if data.size not in (None, "auto"):
        width, height = parameters.parse_size("size", data.size, config.generation)
    settings = parameters.settings_for(
        config.generation, limits, SNAKE_NAMES, model, negative_prompt=data.negative_prompt,
        width=width, height=height, steps=data.steps, guidance_scale=data.guidance_scale)
    seed = None if data.seed is None else parameters.check_seed("seed", data.seed)
    return [data.prompt] * n, settings, seed, model


def _b64_png(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode("ascii")


class OpenAIController(Controller):
    path = PREFIX
    tags = ["OpenAI-compatible"]
    security = BEARER
    request_class = StrictJSONRequest

    @post(
        "/images/generations",
        status_code=200,
        summary="Generate images (OpenAI-compatible)",
        description="OpenAI's images API on this server: `n` images of `prompt`, at the model's"
                    " price each (1 credit unless config.toml says otherwise),"
                    " charged and queued like POST /api/playground/images. The answer waits"
                    " for the images, up to openai.wait_timeout seconds. `url` results point"
                    " at this server and need the same API key.",
        responses=error_responses(400, 401, 402, 413, 415, 500, 503, 504),
    )
    async def generations(self, request: Request[KeyOwner, Any, Any],
                          data: JSONBody[OpenAIImageRequest], jobs: Jobs,
                          config: Settings, catalog: Models) -> OpenAIImagesResponse:
        prompts, settings, seed, model = _check_request(data, config, catalog)
        created = int(time.time())
        account_id = request.user.account_id
        submitted = await anyio.to_thread.run_sync(jobs.submit, JobRequest(
            account_id, request.user.key_id, prompts, settings, seed,
            credits_per_image=model.credits_per_image))
        job_id = submitted.job_id
        job = await self._wait(jobs, account_id, job_id, config.openai.wait_timeout)

        finished = [image for image in job.images if image.status == ImageStatus.COMPLETED]
        if not finished:
            reason = next((image.error for image in job.images if image.error), "unknown")
            raise NoImageMade(f"No image could be made ({reason}); the credits were refunded")
        if data.response_format == "url":
            image_url = api_image_url(request)
            return OpenAIImagesResponse(created, [
                OpenAIImage(url=image_url(job_id, image.index)) for image in finished])

        def encode() -> list[OpenAIImage]:
            return [OpenAIImage(b64_json=_b64_png(jobs.image_path(account_id, job_id, image.index)))
                    for image in finished]

        return OpenAIImagesResponse(created, await anyio.to_thread.run_sync(encode))

    @staticmethod
    async def _wait(jobs: JobService, account_id: int, job_id: str, timeout: float) -> JobView:
        deadline = time.monotonic() + timeout
        while True:
            job = await anyio.to_thread.run_sync(jobs.read, account_id, job_id)
            if job.status.finished:
                return job
            if time.monotonic() >= deadline:
                refunded = await anyio.to_thread.run_sync(jobs.cancel, account_id, job_id)
                raise ImagesTimedOut(
                    f"The images were not ready within {timeout:g} seconds; {refunded} not yet"
                    f" started were cancelled and refunded. Job {job_id} keeps any others"
                    f" (GET /api/playground/images/{job_id}).")
            await anyio.sleep(POLL_SECONDS)

    @get(
        "/models",
        sync_to_thread=False,
        summary="List the installed models (OpenAI-compatible)",
        description="Every model a request may name, the default one first; broken ones are"
                    " left out (GET /api/models says why).",
        responses=error_responses(401),
    )
    def models(self, request: Request[KeyOwner, Any, Any], catalog: Models) -> OpenAIModelList:
        served = [model for model in catalog.models() if not model.problem]
        served.sort(key=lambda model: model.name != catalog.default_name)
        return OpenAIModelList(data=[OpenAIModel(
            id=model.name, created=model.created, default=model.name == catalog.default_name,
            credits_per_image=model.credits_per_image,
            size=f"{model.defaults.width}x{model.defaults.height}", steps=model.defaults.steps,
            guidance_scale=model.defaults.guidance_scale) for model in served])
