"""create_app(services) -> the Litestar application: the API, the console and the probes.

The services are built once at startup (Services.build) and handed to the handlers through
Litestar's dependency injection: a handler names the service it needs as a
parameter (`jobs: Jobs`, see dependencies.py). Middleware and guards, which DI does not
reach, get theirs when they are made.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from litestar import Litestar, Router
from litestar.openapi import OpenAPIConfig
from litestar.openapi.spec import Components, SecurityScheme

from appliance.accounts.service import SharedKeyRateLimiter
from appliance.core.version import package_version
from appliance.services import Services
from appliance.web.access_log import access_line
from appliance.web.api.auth import ApiKeyMiddleware
from appliance.web.api.errors import EXCEPTION_HANDLERS
from appliance.web.api.images import ImagesController
from appliance.web.api.limits import AllowedHostsMiddleware, HostPolicy, KeyRateLimiter
from appliance.web.api.models import list_models
from appliance.web.api.openai_compat import OpenAIController, openai_errors_on_v1
from appliance.web.console import ConsolePlugin
from appliance.web.console.rendering import console_errors_under_console
from appliance.web.console.security import over_https
from appliance.web.dependencies import dependencies
from appliance.web.health import healthz, metrics, readyz
from appliance.web.http_metrics import HttpMetricsMiddleware
from appliance.web.write_admission import WriteAdmissionMiddleware


def rate_limiter(services: Services) -> KeyRateLimiter | SharedKeyRateLimiter:
    """The request rate per API key: counted in the database when several nodes share it,
    else in this process's memory, which costs no round trip."""
    per_minute = services.config.limits.requests_per_minute_per_key
    if services.config.cluster_mode:
        return SharedKeyRateLimiter(services.database, per_minute)
    return KeyRateLimiter(per_minute)


def create_app(services: Services) -> Litestar:
    """The app serving `services` (from Services.build); its lifespan starts and stops them."""
    config = services.config

    @contextlib.asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        services.start()
        try:
            yield
        finally:
            await services.stop()

    api = Router(path="/", route_handlers=[ImagesController, OpenAIController, list_models],
                 middleware=[ApiKeyMiddleware(services.keys, rate_limiter(services))])
    return Litestar(
        route_handlers=[healthz, readyz, metrics, api],
        dependencies=dependencies(services),
        lifespan=[lifespan],
        # The web console: its routes, sessions, CSRF protection and templates.
        plugins=[ConsolePlugin(services)],
        exception_handlers=openai_errors_on_v1(console_errors_under_console(EXCEPTION_HANDLERS)),
        # The process configures logging once (runtime/logs.py); one format in the journal.
        logging_config=None,
        # First (outermost): the Host header is checked before the metrics, or
        # anything else, reads the request's URL, which is made from it.
        middleware=[AllowedHostsMiddleware(HostPolicy.for_server(config.server)),
                    # Requests by route template, never by raw path: one series per
                    # route, whatever ids clients send.
                    HttpMetricsMiddleware(),
                    WriteAdmissionMiddleware(config.storage.busy_timeout_seconds)],
        # Every response, refusals and unknown paths included.
        before_send=[over_https, *([access_line] if config.logging.access_log else [])],
        request_max_body_size=config.limits.max_request_bytes,
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
