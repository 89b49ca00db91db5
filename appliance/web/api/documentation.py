"""How the APIs document their error answers in the OpenAPI document."""

from __future__ import annotations

from litestar.openapi.datastructures import ResponseSpec
from litestar.openapi.spec import SecurityRequirement

BEARER: list[SecurityRequirement] = [{"apiKey": []}]


def error_responses(body: type, meanings: dict[int, str], *codes: int) -> dict[int, ResponseSpec]:
    """The answers with these status codes, each with its body shape and what it means."""
    return {code: ResponseSpec(data_container=body, description=meanings[code]) for code in codes}
