"""The Idempotency-Key header of POST /api/playground/images, as the API reads and documents it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgspec
from litestar import Request
from litestar.openapi.spec import OpenAPIType, Operation, Parameter, Schema

from appliance.jobs import idempotency

DESCRIPTION = (
    "Any unique string of visible ASCII characters, such as a UUID. A retry with the same key"
    " (from any API key of the account, within 24 hours) gets the first answer again, with"
    " `Idempotent-Replayed: true`, and is not charged again. The same key with a different"
    " request is refused with 422."
)


def from_request(request: Request, data: Any) -> idempotency.IdempotentRequest | None:
    # The header is read here rather than declared as a handler parameter: a
    # declared one makes Litestar coerce the body leniently ("2" for 2).
    return idempotency.from_header(request.headers.get(idempotency.HEADER),
                                   request.url.path.encode() + msgspec.json.encode(data))


@dataclass
class IdempotentOperation(Operation):
    """The operation's OpenAPI entry with the optional Idempotency-Key header."""

    def __post_init__(self) -> None:
        self.parameters = [*(self.parameters or []), Parameter(
            name=idempotency.HEADER, param_in="header", required=False, description=DESCRIPTION,
            schema=Schema(type=OpenAPIType.STRING, min_length=1,
                          max_length=idempotency.MAX_KEY_LENGTH, pattern=r"^[\x21-\x7e]+$"),
        )]
