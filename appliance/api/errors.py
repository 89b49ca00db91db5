"""Every error leaves as JSON with an `error` sentence, whatever raised it."""

from __future__ import annotations

import logging
import re
from typing import Any

from litestar import Request, Response
from litestar.exceptions import HTTPException, ValidationException

from ..errors import ApplianceError

log = logging.getLogger(__name__)

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
    if m := re.fullmatch(r"Expected `(\w+)`, got `(\w+)`", message):
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
    return _json_error(message, exc.status_code, exc.headers)


def appliance_error(request: Request, exc: ApplianceError) -> Response[Any]:
    return _json_error(exc.message, exc.status, exc.headers)


def unexpected_error(request: Request, exc: Exception) -> Response[Any]:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return _json_error("Internal server error", 500)


def _json_error(message: str, status: int, headers: dict[str, str] | None = None) -> Response[Any]:
    return Response({"error": message}, status_code=status, headers=headers or {})


EXCEPTION_HANDLERS = {
    ApplianceError: appliance_error,
    ValidationException: validation_error,
    HTTPException: http_error,
    Exception: unexpected_error,
}
