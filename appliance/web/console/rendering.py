"""Templates, their filters, and how errors look in the console."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from litestar import Request, Response
from litestar.exceptions import HTTPException, ValidationException
from litestar.plugins.jinja import JinjaTemplateEngine
from litestar.response import Redirect, Template
from litestar.template.config import TemplateConfig
from litestar.types import ExceptionHandlersMap

from appliance.core.database import DatabaseError, is_busy, is_unreachable
from appliance.core.errors import ApplianceError, DatabaseBusy, DatabaseUnreachable
from appliance.web.api import errors as api_errors
from appliance.web.console.security import SECURITY_HEADERS, SignInRequired

TEMPLATES = Path(__file__).parent / "templates"
STATIC = Path(__file__).parent / "static"
LOGIN_PATH = "/login"
CONSOLE_PATH = "/console"


def when(iso: str | None) -> str:
    """'2025-01-31T13:45:07.123Z' -> '2025-01-31 13:45 UTC'."""
    if not iso:
        return "never"
    return f"{iso[:10]} {iso[11:16]} UTC"


def signed(number: int) -> str:
    return f"+{number}" if number > 0 else str(number)


def _add_filters(engine: JinjaTemplateEngine) -> None:
    engine.engine.filters.update(when=when, signed=signed)


def template_config() -> TemplateConfig:
    return TemplateConfig(directory=TEMPLATES, engine=JinjaTemplateEngine,
                          engine_callback=_add_filters)


def page(request: Request, template: str, status_code: int = 200, **context: Any) -> Template:
    me = request.scope.get("user")
    # The raw path: request.url parses the Host header too, and an error page
    # must render whatever that header holds.
    return Template(template_name=template, status_code=status_code,
                    context={"me": me, "path": request.scope.get("path", ""), **context})


def wants_html(request: Request) -> bool:
    return "text/html" in request.headers.get("accept", "")


def safe_next(target: str | None) -> str:
    """Where to go after signing in: only a console page of this site."""
    if target and target.startswith(CONSOLE_PATH) and "//" not in target and "\\" not in target:
        return target
    return CONSOLE_PATH


def _html_error(request: Request, message: str, status: int,
                headers: dict[str, str] | None = None) -> Response[Any]:
    response = page(request, "error.html", status_code=status, message=message, status=status)
    response.headers.update({**(headers or {}), **SECURITY_HEADERS, "Cache-Control": "no-store"})
    return response


def _with_headers(response: Response[Any]) -> Response[Any]:
    response.headers.update({**SECURITY_HEADERS, "Cache-Control": "no-store"})
    return response


def console_error(request: Request, exc: Exception) -> Response[Any]:
    """People get a page; the console's own scripts and other clients get JSON."""
    if isinstance(exc, DatabaseError) and is_busy(exc):
        # Another writer held the lock past the busy timeout: the API's 503, not a 500.
        exc = DatabaseBusy()
    elif isinstance(exc, DatabaseError) and is_unreachable(exc):
        exc = DatabaseUnreachable()
    if isinstance(exc, SignInRequired) and wants_html(request):
        asked = request.scope.get("query_string", b"").decode("latin-1")
        target = request.scope.get("path", "") + (f"?{asked}" if asked else "")
        query = urlencode({"next": target}) if request.method == "GET" else ""
        return _with_headers(Redirect(f"{LOGIN_PATH}?{query}" if query else LOGIN_PATH,
                                      status_code=303))
    if isinstance(exc, ApplianceError):
        response = api_errors.appliance_error(request, exc)
        message, status = exc.message, exc.status
    elif isinstance(exc, ValidationException):
        response = api_errors.validation_error(request, exc)
        message, status = "The form is missing a field or has a wrong value", 400
    elif isinstance(exc, HTTPException):
        response = api_errors.http_error(request, exc)
        message, status = _page_message(exc), exc.status_code
    else:
        response = api_errors.unexpected_error(request, exc)
        message, status = "Something went wrong on the server; it has been logged", 500
    if wants_html(request):
        return _html_error(request, message, status, dict(response.headers))
    return _with_headers(response)


def _page_message(exc: HTTPException) -> str:
    if exc.detail == "CSRF token verification failed":
        return ("The form had expired or came from another site, so it was not accepted."
                " Go back, reload the page and try again.")
    if exc.status_code == 404:
        return "There is no such page"
    if exc.status_code == 405:
        return "That address cannot be used this way"
    return exc.detail


def console_errors_under_console(handlers: dict) -> dict:
    """The app's exception handlers, answering as the console for paths under /console.

    The console's routers have their own handlers; this is for the addresses
    under /console that no route matches, which only the app's handlers see.
    """
    def under_console(native: Callable) -> Callable:
        def handle(request: Request, exc: Exception) -> Response[Any]:
            path = request.scope.get("path", "")
            if path == CONSOLE_PATH or path.startswith(CONSOLE_PATH + "/"):
                return console_error(request, exc)
            return native(request, exc)

        return handle

    return {key: under_console(native) for key, native in handlers.items()}


CONSOLE_EXCEPTION_HANDLERS: ExceptionHandlersMap = {
    ApplianceError: api_errors.guarded(console_error),
    ValidationException: api_errors.guarded(console_error),
    HTTPException: api_errors.guarded(console_error),
    Exception: api_errors.guarded(console_error),
}
