"""Every error leaves as JSON with an `error` sentence, whatever raised it.

A handler names the request by its raw scope, never by `request.url`, which
parses the Host header and so fails on a hostile one; and a handler that fails
all the same still answers (see `guarded`).
"""

from __future__ import annotations

import errno
import logging
import re
from collections.abc import Callable
from typing import Any

from litestar import Request, Response
from litestar.exceptions import HTTPException, ValidationException

from appliance.core.database import DatabaseError, is_busy, is_full, is_unreachable
from appliance.core.errors import ApplianceError, DatabaseBusy, DatabaseUnreachable

log = logging.getLogger(__name__)

# (request, exception) -> the answer
ExceptionHandler = Callable[[Request, Any], Response[Any]]

_TYPE_WORDS = {"array": "a list", "str": "a string", "int": "a number", "float": "a number",
               "object": "a JSON object", "null": "null", "bool": "true or false"}


def _type_word(name: str) -> str:
    return _TYPE_WORDS.get(name, name)


def body_problem(message: str, key: str) -> str:
    """Rewords one msgspec validation message about the request body."""
    where = "the request body" if key == "data" else f"'{key}'"
    if m := re.fullmatch(r"Object missing required field `(\w+)`", message):
        return f"the request body has no '{m[1]}' field"
    if m := re.fullmatch(r"Object contains unknown field `(\w+)`", message):
        return f"the request body has an unknown field '{m[1]}'"
    # Optional fields are typed `T | null`; null is their default, not worth naming.
    if re.fullmatch(r"Expected `int( \| null)?`, got `float`", message):
        return f"{where} must be a whole number"
    if m := re.fullmatch(r"Expected `(\w+)(?: \| null)?`, got `(\w+)`", message):
        return f"{where} must be {_type_word(m[1])}, not {_type_word(m[2])}"
    if key == "data":
        return "the request body is empty or not a JSON object"
    return f"{where}: {message}"


def validation_error(request: Request, exc: ValidationException) -> Response[Any]:
    extra = exc.extra if isinstance(exc.extra, list) else []
    body = [e for e in extra if isinstance(e, dict) and e.get("source") == "body"]
    if body:
        message = body_problem(str(body[0].get("message", "")), str(body[0].get("key", "")))
    elif extra and isinstance(extra[0], dict):
        first = extra[0]
        message = f"'{first.get('key')}' is not valid: {first.get('message')}"
    else:
        message = exc.detail
    return _json_error(message, 400)


def http_error(request: Request, exc: HTTPException) -> Response[Any]:
    message = exc.detail
    if message.startswith("JSON is malformed"):
        message = "the request body is not valid JSON" + message[len("JSON is malformed"):]
    if exc.status_code == 413:
        limit = request.app.request_max_body_size
        message = f"the request body is larger than {limit} bytes (limits.max_request_bytes)"
    return _json_error(message, exc.status_code, exc.headers)


def appliance_error(request: Request, exc: ApplianceError) -> Response[Any]:
    return _json_error(exc.message, exc.status, exc.headers)


# Seconds a client should wait for a full disk: it needs a person.
FULL_RETRY_AFTER_SECONDS = 60


def database_error(request: Request, exc: Exception) -> Response[Any]:
    """A locked, full or unreachable database is the server's passing trouble, not a bug:
    503, retry later.

    Every write runs in one transaction, so whatever failed left nothing behind.
    """
    if is_busy(exc):
        log.warning("database busy on %s: %s", where(request), exc)
        return appliance_error(request, DatabaseBusy())
    if is_unreachable(exc):
        log.warning("database unreachable on %s: %s", where(request), exc)
        return appliance_error(request, DatabaseUnreachable())
    if is_full(exc):
        return _disk_full(request, exc)
    return unexpected_error(request, exc)


def os_error(request: Request, exc: OSError) -> Response[Any]:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return _disk_full(request, exc)
    return unexpected_error(request, exc)


def _disk_full(request: Request, exc: Exception) -> Response[Any]:
    log.error("disk full on %s: %s", where(request), exc)
    return _json_error("The server's disk is full; nothing was changed. Try again later", 503,
                       {"Retry-After": str(FULL_RETRY_AFTER_SECONDS)})


def unexpected_error(request: Request, exc: Exception) -> Response[Any]:
    log.exception("unhandled error on %s", where(request))
    return _json_error("Internal server error", 500)


def _json_error(message: str, status: int, headers: dict[str, str] | None = None) -> Response[Any]:
    return Response({"error": message}, status_code=status, headers=headers or {})


def where(request: Request) -> str:
    """The request's method and path for a log line, from the raw scope; escaped when the
    path holds what would break the line (a decoded %0A, say)."""
    scope = request.scope
    method, path = scope.get("method", "?"), scope.get("path", "")
    return f"{method} {path if path.isprintable() else ascii(path)}"


def guarded(handler: ExceptionHandler) -> ExceptionHandler:
    """`handler`, with a plain answer when it fails itself.

    Otherwise the failure would leave the app and the server would log both
    tracebacks, chained, for every such request: here it is one log line, and the
    client still gets JSON with the status the first error meant.
    """
    def handle(request: Request, exc: Exception) -> Response[Any]:
        try:
            return handler(request, exc)
        except Exception as failure:  # noqa: BLE001 - the last word on any request
            log.error("could not answer %s on %s: %s: %s", type(exc).__name__, where(request),
                      type(failure).__name__, failure)
            if isinstance(exc, ApplianceError):
                return _json_error(exc.message, exc.status)
            if isinstance(exc, HTTPException):
                return _json_error(exc.detail, exc.status_code)
            return _json_error("Internal server error", 500)

    return handle


EXCEPTION_HANDLERS: dict[type[Exception], ExceptionHandler] = {
    ApplianceError: appliance_error,
    ValidationException: validation_error,
    HTTPException: http_error,
    **dict.fromkeys(DatabaseError, database_error),
    OSError: os_error,
    Exception: unexpected_error,
}
