"""A line a request (`[logging] access_log`): the client, the method and target, the status.

Written by the app's before-send hook as the answer starts, so every answer the
app sends has one: unknown paths, refused hosts and errors included. uvicorn's
own access line is off: it re-quoted the path, gathered the client's address
and went through the general formatter for every request, a tenth of a status
poll; this one takes the target as the client sent it, and runtime/logs.py
formats it on a path of its own.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # runtime/logs.py imports the logger's name: no framework for that
    from litestar.types import Message, Scope

ACCESS_LOGGER = "appliance.access"
# The record's args, in this order: client ("host:port"), method, target, status.
ACCESS_MESSAGE = "%s %s %s %d"

log = logging.getLogger(ACCESS_LOGGER)


def request_target(scope: Scope) -> str:
    """The path and query as the client sent them (percent-encoded, as on the wire)."""
    raw = scope.get("raw_path")
    target = raw.decode("latin-1") if raw else scope["path"]
    query = scope.get("query_string")
    return f"{target}?{query.decode('latin-1')}" if query else target


async def access_line(message: Message, scope: Scope) -> None:
    """The app's before-send hook that writes the access line."""
    if message["type"] != "http.response.start" or not log.isEnabledFor(logging.INFO):
        return
    client = scope.get("client")
    log.info(ACCESS_MESSAGE, f"{client[0]}:{client[1]}" if client else "-",
             scope["method"], request_target(scope),  # type: ignore[typeddict-item]
             message["status"])
