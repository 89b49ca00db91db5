"""Server-side console sessions in SQLite, so a restart signs nobody out.

The browser holds a random session id; the database holds only its SHA-256
digest, so a copy of the database cannot be replayed as a signed-in browser.
Rows past their expires_at are refused here and pruned by the scheduler.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import anyio.to_thread
from litestar.connection import ASGIConnection
from litestar.datastructures import Cookie, MutableScopeHeaders
from litestar.middleware.session.server_side import (
    ServerSideSessionBackend,
    ServerSideSessionConfig,
)
from litestar.stores.base import Store
from litestar.types import Empty, Message, ScopeSession

from appliance.core.clock import parse_utc, utc_clock, utc_iso
from appliance.core.database import ConnectionPool, Database, unless_busy
from appliance.core.digests import sha256_hex

STORE_NAME = "console_sessions"
COOKIE_NAME = "console_session"
# An idle session's expiry is pushed back at most once a minute, so a page
# that polls for progress does not turn every poll into a write.
RENEW_STEP = timedelta(seconds=60)

# Kept in the request's state between loading the session and storing it.
_LOADED_ID = "appliance.console.session_id"
_LOADED_DATA = "appliance.console.session_data"
_ROTATE = "appliance.console.rotate_session"


def _seconds(value: int | timedelta | None) -> timedelta | None:
    if value is None or isinstance(value, timedelta):
        return value
    return timedelta(seconds=value)


class DatabaseSessionStore(Store):
    """A Litestar store over the console_sessions table."""

    def __init__(self, database: ConnectionPool):
        self._pool = database

    def _database(self) -> Database:
        # Called on the worker thread: each thread has its own connection.
        return self._pool.db()

    async def set(self, key: str, value: str | bytes,
                  expires_in: int | timedelta | None = None) -> None:
        await anyio.to_thread.run_sync(self._set, key, value, _seconds(expires_in))

    async def get(self, key: str, renew_for: int | timedelta | None = None) -> bytes | None:
        return await anyio.to_thread.run_sync(self._get, key, _seconds(renew_for))

    async def delete(self, key: str) -> None:
        await anyio.to_thread.run_sync(self._delete, key)

    async def delete_all(self) -> None:
        await anyio.to_thread.run_sync(self._delete_all)

    async def exists(self, key: str) -> bool:
        return await self.get(key) is not None

    async def expires_in(self, key: str) -> int | None:
        return await anyio.to_thread.run_sync(self._expires_in, key)

    def _set(self, key: str, value: str | bytes, expires_in: timedelta | None) -> None:
        data = value.encode("utf-8") if isinstance(value, str) else value
        expires_at = utc_iso(utc_clock() + expires_in) if expires_in else None
        self._database().execute(
            "INSERT INTO console_sessions (key_hash, value, expires_at) VALUES (?, ?, ?)"
            " ON CONFLICT (key_hash) DO UPDATE SET value = excluded.value,"
            " expires_at = excluded.expires_at",
            [sha256_hex(key), data, expires_at],
        )

    def _get(self, key: str, renew_for: timedelta | None) -> bytes | None:
        db = self._database()
        key_hash = sha256_hex(key)
        row = db.execute("SELECT value, expires_at FROM console_sessions WHERE key_hash = ?",
                         [key_hash]).fetchone()
        if row is None:
            return None
        value, expires_at = row
        now = utc_clock()
        if expires_at is not None:
            # ISO 8601 UTC text in one format: comparing text is comparing times.
            # Neither write waits for the lock, so that a page is never held up by
            # another writer: an expired row left behind is swept by housekeeping, and
            # a renewal missed now is made by the next request (within the minute).
            if expires_at <= utc_iso(now):
                unless_busy(db, "DELETE FROM console_sessions WHERE key_hash = ?", [key_hash])
                return None
            if renew_for and utc_iso(now + renew_for - RENEW_STEP) > expires_at:
                unless_busy(db, "UPDATE console_sessions SET expires_at = ? WHERE key_hash = ?",
                            [utc_iso(now + renew_for), key_hash])
        return bytes(value)

    def _delete(self, key: str) -> None:
        self._database().execute("DELETE FROM console_sessions WHERE key_hash = ?",
                                 [sha256_hex(key)])

    def _delete_all(self) -> None:
        self._database().execute("DELETE FROM console_sessions")

    def _expires_in(self, key: str) -> int | None:
        row = self._database().execute("SELECT expires_at FROM console_sessions WHERE key_hash = ?",
                                       [sha256_hex(key)]).fetchone()
        if row is None or row[0] is None:
            return None
        left = parse_utc(row[0]) - utc_clock()
        return max(0, int(left.total_seconds()))


def rotate_session_id(connection: ASGIConnection) -> None:
    """Makes this response carry a fresh session id and forget the old one (at sign-in)."""
    connection.state[_ROTATE] = True


class ConsoleSessionBackend(ServerSideSessionBackend):
    """Litestar's server-side sessions, with three changes.

    A session id is only ever one this server made (a cookie naming no stored
    session is ignored, never adopted); a visitor with an empty session gets
    no row and no cookie; and a handler can ask for a new id (sign-in).
    """

    async def load_from_connection(self, connection: ASGIConnection) -> dict[str, Any]:
        session_id = connection.cookies.get(self.config.key)
        if session_id:
            store = self.config.get_store_from_app(connection.scope["app"])
            data = await self.get(session_id, store=store)
            if data is not None:
                connection.state[_LOADED_ID] = session_id
                connection.state[_LOADED_DATA] = data
                return self.deserialize_data(data)
        return {}

    def get_session_id(self, connection: ASGIConnection) -> str:
        loaded: str | None = connection.state.get(_LOADED_ID)
        return loaded or self.generate_session_id()

    async def store_in_message(self, scope_session: ScopeSession, message: Message,
                               connection: ASGIConnection) -> None:
        scope = connection.scope
        store = self.config.get_store_from_app(scope["app"])
        headers = MutableScopeHeaders.from_message(message)
        state = connection.state
        loaded_id: str | None = state.get(_LOADED_ID)
        if scope_session is Empty or not scope_session:
            if loaded_id:
                await self.delete(loaded_id, store=store)
            if connection.cookies.get(self.config.key):
                headers.add("Set-Cookie", self._cookie("", expires=0))
            return
        session_id = loaded_id
        if session_id is None or state.pop(_ROTATE, False):
            if session_id:
                await self.delete(session_id, store=store)
            session_id = self.generate_session_id()
        data = self.serialize_data(scope_session, scope)
        # Unchanged data was already renewed by the read; skip the write.
        if session_id != loaded_id or data != state.get(_LOADED_DATA):
            await self.set(session_id=session_id, data=data, store=store)
        headers.add("Set-Cookie", self._cookie(session_id))

    def _cookie(self, value: str, **extra: Any) -> str:
        config = self.config
        params = {"max_age": config.max_age, **extra} if value else extra
        # Secure here only by configuration (console.secure_cookies); over HTTPS,
        # security.over_https makes every cookie Secure.
        return Cookie(key=config.key, value=value, path=config.path, domain=config.domain,
                      secure=config.secure, httponly=config.httponly, samesite=config.samesite,
                      **params).to_header(header="")


@dataclass
class ConsoleSessionConfig(ServerSideSessionConfig):
    _backend_class = ConsoleSessionBackend

    key: str = field(default=COOKIE_NAME)
    store: str = field(default=STORE_NAME)
    renew_on_access: bool = field(default=True)
    httponly: bool = field(default=True)
    samesite: str = field(default="lax")  # type: ignore[assignment]
