"""Per-request generation parameters, checked against the bounds in config.toml.

Both APIs use these checks; each names the fields its own way (camelCase on
/api, OpenAI's snake_case on /v1), so every check takes the name to report.
"""

from __future__ import annotations

import math
import re

from appliance.core.config import GenerationConfig, LimitsConfig
from appliance.core.errors import BadRequest
from appliance.jobs.catalog import Catalog, InstalledModel
from appliance.jobs.models import MAX_SEED, GenerationSettings

SIZE_MULTIPLE = 8  # Stable Diffusion's VAE works on 8x8 pixel blocks
# LoRA adapters one request may apply, and the scales each may have (negative
# scales push an image away from the adapter's style).
MAX_LORAS = 5
LORA_SCALE = (-4.0, 4.0)
_SIZE = re.compile(r"(\d{1,5})x(\d{1,5})")


class InvalidParameter(BadRequest):
    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


def check_side(name: str, value: int, generation: GenerationConfig) -> int:
    low, high = generation.min_size, generation.max_size
    if value % SIZE_MULTIPLE or not low <= value <= high:
        raise InvalidParameter(name, f"'{name}' is {value}; it must be a multiple of"
                                     f" {SIZE_MULTIPLE} from {low} to {high}")
    return value


def check_steps(name: str, value: int, generation: GenerationConfig) -> int:
    low, high = generation.min_steps, generation.max_steps
    if not low <= value <= high:
        raise InvalidParameter(name, f"'{name}' is {value}; it must be from {low} to {high}")
    return value


def check_guidance_scale(name: str, value: float, generation: GenerationConfig) -> float:
    low, high = generation.min_guidance_scale, generation.max_guidance_scale
    # `not low <= value <= high` also refuses NaN.
    if not math.isfinite(value) or not low <= value <= high:
        raise InvalidParameter(name, f"'{name}' is {value}; it must be from {low} to {high}")
    return float(value)


def check_seed(name: str, value: int) -> int:
    if not 0 <= value <= MAX_SEED:
        raise InvalidParameter(name, f"'{name}' is {value}; it must be from 0 to {MAX_SEED}")
    return value


def check_negative_prompt(name: str, value: str, limits: LimitsConfig) -> str | None:
    if len(value) > limits.max_prompt_length:
        raise InvalidParameter(name, f"'{name}' is {len(value)} characters long; the limit is"
                                     f" {limits.max_prompt_length}")
    # A blank negative prompt is what the pipeline uses without one; one
    # spelling keeps such jobs batching together.
    return value if value.strip() else None


def parse_size(name: str, value: str, generation: GenerationConfig) -> tuple[int, int]:
    """'WIDTHxHEIGHT' -> (width, height), each side checked."""
    match = _SIZE.fullmatch(value.strip())
    if not match:
        raise InvalidParameter(name, f"'{name}' is {value!r}; it must be WIDTHxHEIGHT in pixels,"
                                     f" such as {generation.width}x{generation.height}")
    return (check_side(name, int(match[1]), generation),
            check_side(name, int(match[2]), generation))


def check_loras(catalog: Catalog, model: InstalledModel,
                loras: list[tuple[str, float]] | None, field: str) -> tuple[tuple[str, float], ...]:
    """The adapters a request asked for, as (name, scale) sorted by name; each must be
    installed, fit `model`, appear once and have a scale within LORA_SCALE."""
    if not loras:
        return ()
    if len(loras) > MAX_LORAS:
        raise InvalidParameter(field, f"'{field}' has {len(loras)} adapters; at most"
                                      f" {MAX_LORAS} may be applied at once")
    chosen: dict[str, float] = {}
    low, high = LORA_SCALE
    for i, (name, scale) in enumerate(loras):
        where = f"{field}[{i}]"
        catalog.lora(name, model, f"{where}.name")
        if name in chosen:
            raise InvalidParameter(field, f"'{where}.name' is {name!r}, which is already"
                                          " applied: name each adapter once")
        if not math.isfinite(scale) or not low <= scale <= high:
            raise InvalidParameter(field, f"'{where}.scale' is {scale}; it must be from {low}"
                                          f" to {high}")
        chosen[name] = float(scale)
    return tuple(sorted(chosen.items()))


def settings_for(
    generation: GenerationConfig,
    limits: LimitsConfig,
    names: dict[str, str],
    model: InstalledModel,
    *,
    loras: tuple[tuple[str, float], ...] = (),
    negative_prompt: str | None = None,
    width: int | None = None,
    height: int | None = None,
    steps: int | None = None,
    guidance_scale: float | None = None,
) -> GenerationSettings:
    """The settings a request asked for, the model's defaults where it did not.

    `names` maps each parameter to the name the request used for it.
    """
    defaults = model.defaults
    return GenerationSettings(
        width=defaults.width if width is None else check_side(names["width"], width, generation),
        height=(defaults.height if height is None
                else check_side(names["height"], height, generation)),
        steps=defaults.steps if steps is None else check_steps(names["steps"], steps, generation),
        guidance_scale=(defaults.guidance_scale if guidance_scale is None
                        else check_guidance_scale(names["guidance_scale"], guidance_scale,
                                                  generation)),
        negative_prompt=(None if negative_prompt is None
                         else check_negative_prompt(names["negative_prompt"], negative_prompt,
                                                    limits)),
        model=model.name,
        loras=loras,
    )


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
