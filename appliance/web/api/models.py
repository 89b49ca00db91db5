"""GET /api/models: the installed models a request may name, with their defaults and price."""

from __future__ import annotations

from typing import Any

from litestar import Request, get

from appliance.accounts.keys import KeyOwner
from appliance.jobs.catalog import Catalog, InstalledModel
from appliance.web.api.documentation import BEARER
from appliance.web.api.images import error_responses
from appliance.web.api.schemas import ModelInfo, ModelList, ModelParameters
from appliance.web.dependencies import EngineDependency, Models


def model_info(model: InstalledModel, catalog: Catalog, loaded_on: list[str]) -> ModelInfo:
    defaults = model.defaults
    return ModelInfo(
        name=model.name, default=model.name == catalog.default_name, pipeline=model.pipeline,
        credits_per_image=model.credits_per_image,
        parameters=ModelParameters(width=defaults.width, height=defaults.height,
                                   steps=defaults.steps, guidance_scale=defaults.guidance_scale),
        loaded_on=loaded_on,
        loras=[lora.name for lora in catalog.loras() if model.name in lora.base_models],
        problem=model.problem)


@get("/api/models", tags=["Images"], security=BEARER, sync_to_thread=True,
     summary="List the installed models",
     description="Each model a request may name in `model`, with the parameters a request"
                 " for it gets by default, the credits each of its images costs, the engine"
                 " workers that hold it now, and the LoRA adapters made for it.",
     responses=error_responses(401, 429))
def list_models(request: Request[KeyOwner, Any, Any], catalog: Models,
                engine: EngineDependency) -> ModelList:
    holders = engine.status().holders()
    return ModelList(models=[model_info(model, catalog, holders.get(model.name, []))
                             for model in catalog.models()])
