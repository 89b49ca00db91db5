"""JSON request bodies, decoded strictly into the shape their route declares.

Litestar decodes a body to plain values first, then converts them to the
handler's type leniently: "64" passes for 64, and a plain decode of JSON nested
a thousand deep raises RecursionError (a 500). Here the body is decoded once,
straight into the declared struct, with JSON's own types: a number must be a
JSON number, and decoding stops at the first value of the wrong shape, however
deep the rest goes.
"""

from __future__ import annotations

from typing import Any

import msgspec
from litestar import Request
from litestar.exceptions import ValidationException

from appliance.core.errors import ApplianceError, BadRequest


class UnsupportedMediaType(ApplianceError):
    status = 415


def is_json(media_type: str) -> bool:
    """application/json, or a JSON-based type such as application/merge-patch+json."""
    media_type = media_type.strip().lower()
    return media_type == "application/json" or (
        media_type.startswith("application/") and media_type.endswith("+json"))


def _problem(error: msgspec.ValidationError) -> dict[str, str]:
    """msgspec's "Expected `int`, got `str` - at `$.width`" as Litestar reports a body field,
    so that each API's validation handler words it as it words the others."""
    message, _, where = str(error).partition(" - at `$")
    field = where.rstrip("`").removeprefix(".")
    return {"message": message, "key": field or "data", "source": "body"}


class StrictJSONRequest(Request):
    """The request class of the JSON routes: a JSON Content-Type, and a strictly typed body."""

    async def json(self) -> Any:
        media_type, _ = self.content_type
        if not is_json(media_type):
            got = f"'{media_type}'" if media_type else "none"
            raise UnsupportedMediaType(
                f"the request body must be JSON, sent with Content-Type: application/json"
                f" (got {got})")
        body = await self.body()
        data_field = self.route_handler.parsed_data_field
        shape = data_field.annotation if data_field is not None else Any
        try:
            return msgspec.json.decode(body, type=shape, strict=True)
        except msgspec.ValidationError as error:
            raise ValidationException(detail="the request body is not valid",
                                      extra=[_problem(error)]) from None
        except msgspec.DecodeError as error:
            reason = str(error).removeprefix("JSON is malformed: ")
            raise BadRequest(f"the request body is not valid JSON: {reason}") from None
        except RecursionError:
            raise BadRequest("the request body is nested too deeply") from None
