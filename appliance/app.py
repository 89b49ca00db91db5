"""create_app(config) -> the Litestar application."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from importlib.metadata import PackageNotFoundError, version

from litestar import Litestar, Router, get
from litestar.datastructures import State
from litestar.openapi import OpenAPIConfig
from litestar.openapi.spec import Components, SecurityScheme

from .api.auth import ApiKeyMiddleware
from .api.errors import EXCEPTION_HANDLERS
from .api.images import ImagesController
from .config import Config
from .db import Store
from .engine import Engine
from .engine.worker import ImageGenerator
from .jobs import GenerationSettings
from .keys import LastUsedRecorder


def package_version() -> str:
    try:
        return version("ai-media-maker")
    except PackageNotFoundError:
        return "0.0.0"


@get("/healthz", include_in_schema=False, sync_to_thread=False)
def healthz() -> dict[str, str]:
    return {"status": "ok"}


def create_app(config: Config,
               load_generator: Callable[[], ImageGenerator] | None = None) -> Litestar:
    """The app; `load_generator` replaces the diffusers pipeline (tests inject failures)."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        store = Store(config.storage.database)
        engine = Engine(config, store, load_generator)
        app.state.store = store
        app.state.engine = engine
        engine.start()
        try:
            yield
        finally:
            engine.stop()
            store.close()

    api = Router(path="/", route_handlers=[ImagesController], middleware=[ApiKeyMiddleware])
    generation = config.generation
    return Litestar(
        route_handlers=[healthz, api],
        lifespan=[lifespan],
        exception_handlers=EXCEPTION_HANDLERS,
        # The process configures logging once (cli.py); one format in the journal.
        logging_config=None,
        state=State({
            "config": config,
            "last_used": LastUsedRecorder(),
            "default_settings": GenerationSettings(generation.width, generation.height,
                                                   generation.steps, generation.guidance_scale),
        }),
        openapi_config=OpenAPIConfig(
            title="AI Media Maker",
            version=package_version(),
            description="Generate images in bulk from text prompts on your own GPU server.",
            path="/schema",
            components=Components(security_schemes={
                "apiKey": SecurityScheme(type="http", scheme="bearer",
                                         description="`Authorization: Bearer wi_live_<64 hex>`"),
            }),
        ),
    )
