"""Bearer-key authentication for the API routes.

It runs before the body is read, so a bad key is refused whatever the body
holds, with the contract's exact texts.
"""

from __future__ import annotations

from typing import Protocol

import anyio.to_thread
from litestar.enums import ScopeType
from litestar.middleware import ASGIMiddleware
from litestar.types import ASGIApp, Receive, Scope, Send

from appliance.accounts.keys import KeyOwner, token_from_header
from appliance.accounts.service import KeyService
from appliance.core.errors import Unauthorized

TWO_HEADERS = "More than one Authorization header; send exactly one"


class RateLimiter(Protocol):
    """A request rate per key: web/api/limits.py's KeyRateLimiter in one process,
    accounts.service.SharedKeyRateLimiter across a cluster's nodes."""

    asks_database: bool

    def check(self, key_id: int) -> None: ...


class ApiKeyMiddleware(ASGIMiddleware):
    """Sets the request's `user` (the key's KeyOwner) and `auth` (the key's id), as
    Litestar's authentication middleware would, without the connection object it
    builds for every request."""

    scopes = (ScopeType.HTTP,)

    def __init__(self, keys: KeyService, rate_limiter: RateLimiter):
        self.keys = keys
        self.rate_limiter = rate_limiter

    def __deepcopy__(self, memo: dict) -> ApiKeyMiddleware:
        # Litestar copies the routes' middleware; one key service and one rate for all.
        return self

    async def handle(self, scope: Scope, receive: Receive, send: Send, next_app: ASGIApp) -> None:
        owner = await self._owner(scope)
        scope["user"] = owner
        scope["auth"] = owner.key_id
        await next_app(scope, receive, send)

    async def _owner(self, scope: Scope) -> KeyOwner:
        # Two headers could name two keys; picking either would act for one
        # account on the word of a request that also names another.
        # Straight from the scope (ASGI names are lower case): the parsed Headers
        # object is the costlier part of a request that needs one header.
        headers = [value.decode("latin-1") for name, value in scope["headers"]
                   if name == b"authorization"]
        if len(headers) > 1:
            raise Unauthorized(TWO_HEADERS)
        token = token_from_header(headers[0] if headers else None)
        if self.rate_limiter.asks_database:
            # Cluster mode: the key's lookup and its shared budget are round trips to
            # PostgreSQL (the budget a write that may wait for the key's row, which other
            # nodes lock too): one hop to a thread for both, so that the event loop serves
            # other requests meanwhile.
            return await anyio.to_thread.run_sync(self._owner_within_rate, token)
        # SQLite: a read of a local file, checked on every request and quick: here,
        # not on a thread.
        return self._owner_within_rate(token)

    def _owner_within_rate(self, token: str) -> KeyOwner:
        owner = self.keys.owner(token)
        # Any request with a live key is a use of it, one refused for its rate too.
        # Written on a thread of its own: a read must not wait for the write lock.
        if self.keys.use_is_due(owner.key_id):
            self.keys.record_use(owner.key_id)
        self.rate_limiter.check(owner.key_id)
        return owner
