"""How the APIs document their answers in the OpenAPI document."""

from __future__ import annotations

from http import HTTPStatus

from litestar.enums import MediaType
from litestar.openapi.datastructures import ResponseSpec
from litestar.openapi.spec import SecurityRequirement

BEARER: list[SecurityRequirement] = [{"apiKey": []}]


def error_responses(body: type, meanings: dict[int, str], *codes: int) -> dict[int, ResponseSpec]:
    """The answers with these status codes, each with its body shape and what it means."""
    return {code: ResponseSpec(data_container=body, description=meanings[code]) for code in codes}


def success_response(body: type, media_type: str = MediaType.JSON) -> dict[int, ResponseSpec]:
    """The 200 answer of a handler that returns its answer ready to send (an ASGIResponse,
    which the document cannot see into), as it would be documented from a return type."""
    return {HTTPStatus.OK: ResponseSpec(data_container=body, media_type=media_type,
                                        description=HTTPStatus.OK.description,
                                        generate_examples=False)}
