"""The JSON shapes of the API, kept apart from storage. Field names are camelCase."""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from appliance.jobs.models import ImageStatus, JobStatus


class ErrorBody(msgspec.Struct):
    error: str


def doc(text: str) -> msgspec.Meta:
    """A field's description in the OpenAPI document."""
    return msgspec.Meta(description=text)


SIZE_RULE = ("a multiple of 8 within the server's bounds (config.toml generation.min_size to"
             " generation.max_size, by default 64 to 1024)")


class LoraChoice(msgspec.Struct, forbid_unknown_fields=True):
    name: Annotated[str, doc("An installed adapter's name (GET /api/models lists them).")]
    scale: Annotated[float, doc(
        "How strongly it applies, -4 to 4; 1 is as trained, 0 not at all. Default 1.")] = 1.0


class CreateImagesRequest(msgspec.Struct, forbid_unknown_fields=True, rename="camel"):
    prompts: Annotated[list[str], doc("One image is made for each prompt, in order.")]
    model: Annotated[str, doc(
        "An installed model's name (GET /api/models); omitted: the server's default model."
        " The model also sets the defaults of the parameters below, and the price of each"
        " image.")] | None = None
    loras: Annotated[list[LoraChoice], doc(
        "LoRA adapters to apply, at most 5, each installed for this model.")] | None = None
    negative_prompt: Annotated[str, doc(
        "What the images should not show; applies to every prompt. Blank means"
        " none.")] | None = None
    width: Annotated[int, doc(
        f"Width in pixels: {SIZE_RULE}. Default: the model's (GET /api/models).")] | None = None
    height: Annotated[int, doc(
        f"Height in pixels: {SIZE_RULE}. Default: the model's.")] | None = None
    steps: Annotated[int, doc(
        "Denoising steps, within generation.min_steps to generation.max_steps (by default 1 "
        "to 100). Default: generation.steps.")] | None = None
    guidance_scale: Annotated[float, doc(
        "Classifier-free guidance scale, within generation.min_guidance_scale to "
        "generation.max_guidance_scale (by default 0 to 20). Default: "
        "generation.guidance_scale.")] | None = None
    seed: Annotated[int, doc(
        "Base seed, 0 to 4294967295: image i uses (seed + i) mod 2**32, so the same request "
        "on the same device gives the same images. Without it each image gets a random"
        " seed.")] | None = None


class CreateImagesResponse(msgspec.Struct, rename="camel"):
    job_id: str
    total_images: int
    credits_used: int
    credits: int


class JobImage(msgspec.Struct, rename="camel", omit_defaults=True):
    index: int
    prompt: str
    status: ImageStatus
    seed: int
    url: str | None = None
    error: str | None = None
    finished_at: str | None = None


class JobParameters(msgspec.Struct, rename="camel"):
    """The generation parameters the job's images were made with, defaults filled in."""

    negative_prompt: str | None
    width: int
    height: int
    steps: int
    guidance_scale: float
    seed: Annotated[int, doc(
        "The base seed asked for; null when each image drew a random seed (see each image's "
        "seed).")] | None
    model: Annotated[str, doc(
        "The model that makes the images; null for jobs from before models had names.")] | None
    loras: list[LoraChoice]
    credits_per_image: int


class JobResponse(msgspec.Struct, rename="camel"):
    job_id: str
    status: Annotated[JobStatus, doc(
        "queued: no image started yet; processing: some started; completed: all ended, at "
        "least one made; failed: all ended, none made, some failed; cancelled: every image "
        "was cancelled before it started.")]
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
    cancelled_images: int = 0
    queue_position: Annotated[int, doc(
        "How many queued images the engine takes before this job's next one; null when none "
        "of its images is waiting.")] | None = None
    parameters: JobParameters | None = None


# Server-sent events of GET /api/playground/images/{jobId}/events; each one's
# `data` is one of these, as JSON.

class ProgressEvent(msgspec.Struct, rename="camel"):
    """`event: progress`: sent first and whenever the job's state or queue position changes."""

    status: JobStatus
    queue_position: int | None
    total_images: int
    completed_images: int
    failed_images: int
    cancelled_images: int
    pending_images: int


# `event: image` carries a JobImage as it ends (completed, failed or cancelled);
# `event: end` carries the final JobResponse, then the stream closes.


# The OpenAI-compatible API (/v1) uses OpenAI's snake_case names.

class OpenAIError(msgspec.Struct):
    message: str
    type: str
    param: str | None
    code: str | None


class OpenAIErrorBody(msgspec.Struct):
    error: OpenAIError


class OpenAIImageRequest(msgspec.Struct, forbid_unknown_fields=True):
    prompt: Annotated[str, doc("The text to make images of.")]
    n: Annotated[int, doc(
        "How many images, 1 to limits.max_prompts_per_request; each costs the model's price"
        " (1 credit unless config.toml says otherwise). Default 1.")] | None = None
    size: Annotated[str, doc(
        f"WIDTHxHEIGHT, each {SIZE_RULE}. Default (or auto): the server's generation.width x "
        f"generation.height.")] | None = None
    response_format: Annotated[Literal["b64_json", "url"], doc(
        "b64_json (the default here): the PNG inline, base64; url: the image's URL on this "
        "server, fetched with the same API key.")] | None = None
    model: Annotated[str, doc(
        "The model's id from GET /v1/models; omit for the server's default model.")] | None = None
    user: Annotated[str, doc("Accepted for compatibility and ignored.")] | None = None
    quality: Annotated[str, doc("Accepted for compatibility and ignored.")] | None = None
    style: Annotated[str, doc("Accepted for compatibility and ignored.")] | None = None
    # Extensions beyond OpenAI's API (the openai client sends them via extra_body).
    negative_prompt: Annotated[str, doc(
        "Extension: what the images should not show.")] | None = None
    steps: Annotated[int, doc(
        "Extension: denoising steps, within the server's bounds.")] | None = None
    guidance_scale: Annotated[float, doc(
        "Extension: guidance scale, within the server's bounds.")] | None = None
    seed: Annotated[int, doc(
        "Extension: base seed; image i uses (seed + i) mod 2**32.")] | None = None


class OpenAIImage(msgspec.Struct, omit_defaults=True):
    b64_json: str | None = None
    url: str | None = None


class OpenAIImagesResponse(msgspec.Struct):
    created: Annotated[int, doc("Unix time, in seconds, when the job was accepted.")]
    data: list[OpenAIImage]


class OpenAIModel(msgspec.Struct):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "ai-media-maker"
    # Extensions beyond OpenAI's model object (clients keep fields they do not know).
    default: Annotated[bool, doc(
        "Extension: whether a request without `model` gets this one.")] = False
    credits_per_image: Annotated[int, doc("Extension: what each of its images costs.")] = 1
    size: Annotated[str, doc("Extension: the size a request without `size` gets.")] = ""
    steps: Annotated[int, doc("Extension: the steps a request without `steps` gets.")] = 0
    guidance_scale: Annotated[float, doc(
        "Extension: the guidance scale a request without it gets.")] = 0.0


class OpenAIModelList(msgspec.Struct):
    data: list[OpenAIModel]
    object: Literal["list"] = "list"


# GET /api/models: the installed models, as a client picks one.

class ModelParameters(msgspec.Struct, rename="camel"):
    """What a request for the model gets where it names no value."""

    width: int
    height: int
    steps: int
    guidance_scale: float


class ModelInfo(msgspec.Struct, rename="camel", omit_defaults=True):
    name: str
    default: Annotated[bool, doc("Whether a request that names no model gets this one.")]
    pipeline: Annotated[str, doc("The diffusers pipeline class, e.g. StableDiffusionXLPipeline.")]
    credits_per_image: int
    parameters: ModelParameters
    loaded_on: Annotated[list[str], doc(
        "The engine workers that hold it now; a request for another model waits for a"
        " load.")]
    loras: Annotated[list[str], doc("The installed LoRA adapters made for it.")]
    problem: Annotated[str, doc(
        "Why requests for it are refused (its folder is broken); absent when it can be"
        " served.")] | None = None


class ModelList(msgspec.Struct):
    models: list[ModelInfo]
