"""Bearer-key authentication for the API routes.

It runs before the body is read, so a bad key is refused whatever the body
holds, with the contract's exact texts.
"""

from __future__ import annotations

import logging
import sqlite3

import anyio.to_thread
from litestar.connection import ASGIConnection
from litestar.middleware import AbstractAuthenticationMiddleware, AuthenticationResult

from appliance.accounts import keys

log = logging.getLogger(__name__)


class ApiKeyMiddleware(AbstractAuthenticationMiddleware):
    async def authenticate_request(self, connection: ASGIConnection) -> AuthenticationResult:
        token = keys.token_from_header(connection.headers.get("authorization"))
        state = connection.app.state
        owner = await anyio.to_thread.run_sync(_look_up, state, token)
        state.rate_limiter.check(owner.key_id)
        return AuthenticationResult(user=owner, auth=owner.key_id)


def _look_up(state, token: str) -> keys.KeyOwner:
    db = state.database.db()
    owner = keys.find_owner(db, token)
    try:
        state.last_used.record(db, owner.key_id)
    except sqlite3.OperationalError as exc:
        # Last-used is a convenience: a busy or full database must not turn
        # away a request that may only read (a job's status, an image).
        log.warning("could not record when key %d was last used: %s", owner.key_id, exc)
    return owner
