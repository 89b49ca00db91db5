"""Bearer-key authentication for the API routes.

It runs before the body is read, so a bad key is refused whatever the body
holds, with the contract's exact texts.
"""

from __future__ import annotations

import anyio.to_thread
from litestar.connection import ASGIConnection
from litestar.middleware import AbstractAuthenticationMiddleware, AuthenticationResult

from .. import keys


class ApiKeyMiddleware(AbstractAuthenticationMiddleware):
    async def authenticate_request(self, connection: ASGIConnection) -> AuthenticationResult:
        token = keys.token_from_header(connection.headers.get("authorization"))
        state = connection.app.state
        owner = await anyio.to_thread.run_sync(_look_up, state, token)
        return AuthenticationResult(user=owner, auth=owner.key_id)


def _look_up(state, token: str) -> keys.KeyOwner:
    db = state.store.db()
    owner = keys.find_owner(db, token)
    state.last_used.record(db, owner.key_id)
    return owner
