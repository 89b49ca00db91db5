"""create_app(config) -> the Litestar application."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import AsyncIterator, Callable
from importlib.metadata import PackageNotFoundError, version

from litestar import Litestar, Router, get
from litestar.datastructures import State
from litestar.openapi import OpenAPIConfig
from litestar.openapi.spec import Components, SecurityScheme

from appliance.accounts.keys import LastUsedRecorder
from appliance.core.config import Config
from appliance.core.database import ConnectionPool
from appliance.engine.engine import Engine
from appliance.engine.worker import ImageGenerator
from appliance.jobs.models import GenerationSettings
from appliance.web.api.auth import ApiKeyMiddleware
from appliance.web.api.errors import EXCEPTION_HANDLERS
from appliance.web.api.images import ImagesController
from appliance.web.api.limits import AllowedHostsMiddleware, HostPolicy, KeyRateLimiter
from appliance.web.api.openai_compat import OpenAIController, openai_errors_on_v1
from appliance.web.console import ConsolePlugin
from appliance.web.health import metrics, readyz
from appliance.web.operations import HTTP_METRICS, operations_lifespan


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
        database = ConnectionPool(config.storage.database, config.storage.busy_timeout_seconds)
        engine = Engine(config, database, load_generator)
        app.state.database = database
        app.state.engine = engine
        engine.start()
        try:
            yield
        finally:
            engine.stop()
            database.close()

    api = Router(path="/", route_handlers=[ImagesController, OpenAIController],
                 middleware=[ApiKeyMiddleware])
    generation = config.generation
    return Litestar(
        route_handlers=[healthz, readyz, metrics, api],
        # The scheduler and metrics start after the database and engine, and stop before them.
        lifespan=[lifespan, operations_lifespan()],
        # The web console: its routes, sessions, CSRF protection and templates.
        plugins=[ConsolePlugin(config)],
        exception_handlers=openai_errors_on_v1(EXCEPTION_HANDLERS),
        # The process configures logging once (cli.py); one format in the journal.
        logging_config=None,
        middleware=[HTTP_METRICS.middleware,
                    AllowedHostsMiddleware(HostPolicy.for_server(config.server))],
        request_max_body_size=config.limits.max_request_bytes,
        state=State({
            "config": config,
            "last_used": LastUsedRecorder(),
            "rate_limiter": KeyRateLimiter(config.limits.requests_per_minute_per_key),
            # Set when the server begins to shut down: open event streams then
            # close, instead of holding the shutdown until its grace time ends.
            "stopping": threading.Event(),
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
