"""Requests that write wait their turn outside the request threads.

Litestar runs sync handlers on the event loop's default executor, a small
pool (min(32, cores + 4) threads). A write may wait up to the database's busy
timeout for SQLite's write lock, which a backup or a CLI command can hold for
seconds; enough such writes would hold every thread, and the reads queued
behind them (console pages, job polls that need a thread) would wait too,
though WAL lets them read at once. So at most half the pool's threads run
writing requests; the others wait here, on the event loop, holding no thread,
for at most the busy timeout, and are then answered 503 with Retry-After,
having changed nothing.
"""

from __future__ import annotations

import os

import anyio
from litestar.enums import ScopeType
from litestar.middleware import ASGIMiddleware
from litestar.types import ASGIApp, Receive, Scope, Send

from appliance.core.errors import DatabaseBusy

# What HTTP means by a request that changes nothing.
READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def default_executor_threads() -> int:
    """The size of asyncio's default executor, as concurrent.futures sizes it."""
    return min(32, (os.cpu_count() or 1) + 4)


class WriteAdmissionMiddleware(ASGIMiddleware):
    scopes = (ScopeType.HTTP,)

    def __init__(self, wait_seconds: float, writers: int | None = None) -> None:
        self.wait_seconds = wait_seconds
        self.writers = writers or max(1, default_executor_threads() // 2)
        self._turns: anyio.Semaphore | None = None

    def __deepcopy__(self, memo: dict) -> WriteAdmissionMiddleware:
        # Litestar copies the app's middleware per route; all routes share one set of turns.
        return self

    async def handle(self, scope: Scope, receive: Receive, send: Send, next_app: ASGIApp) -> None:
        if scope.get("method") in READ_METHODS:
            await next_app(scope, receive, send)
            return
        if self._turns is None:
            # Made on the serving event loop, on first use.
            self._turns = anyio.Semaphore(self.writers)
        with anyio.move_on_after(self.wait_seconds) as waiting:
            await self._turns.acquire()
        if waiting.cancelled_caught:
            raise DatabaseBusy()
        try:
            await next_app(scope, receive, send)
        finally:
            self._turns.release()
