"""Requests handed to the running app as an HTTP server hands them over: the header list as
sent (duplicates kept; the TestClient joins them with commas) and the path percent-decoded
from the request line, as uvicorn does."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote

import anyio

from .helpers import Client

HOST = (b"host", b"testserver.local")  # the name the test config allows


@dataclass
class Answer:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes

    def header(self, name: str) -> str | None:
        return next((value.decode("latin-1") for key, value in self.headers
                     if key.decode("latin-1").lower() == name), None)

    def json(self) -> Any:
        return json.loads(self.body)


def request(client: Client, method: str, target: str, headers: list[tuple[bytes, bytes]],
            body: bytes = b"") -> Answer:
    """`target` is the request line's path and query; a client percent-encodes what is not
    ASCII in it, and so does this."""
    target = "".join(c if c.isascii() else quote(c) for c in target)
    raw_path, _, query = target.partition("?")
    scope = {
        "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1", "scheme": "http", "method": method,
        "server": ("127.0.0.1", 8000), "client": ("127.0.0.1", 40000), "root_path": "",
        # uvicorn: path = unquote(raw_path.decode("ascii")); non-ASCII bytes come encoded.
        "path": unquote(raw_path), "raw_path": raw_path.encode("ascii"),
        "query_string": query.encode("ascii"), "headers": [HOST, *headers],
    }
    messages: list[dict] = []
    sent = False

    async def receive() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await anyio.sleep_forever()  # the client waits for the answer
        raise AssertionError("unreachable")

    async def send(message: dict) -> None:
        messages.append(message)

    async def call() -> None:
        with anyio.fail_after(30):
            await client.http.app(scope, receive, send)

    client.http.blocking_portal.call(call)
    start = next(m for m in messages if m["type"] == "http.response.start")
    content = b"".join(m.get("body", b"") for m in messages if m["type"] == "http.response.body")
    return Answer(start["status"], list(start.get("headers", [])), content)
