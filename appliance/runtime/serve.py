"""`appliance serve`: the HTTP server, and what it tells systemd.

The server is uvicorn, with connections bounded (connections.py) and HTTPS
when a certificate is configured (core/tls.py).

READY=1 goes out once the server listens and the engine has loaded (and
warmed) the model. After that, WATCHDOG=1 goes out every half watchdog period,
but only while the engine worker keeps coming back to the queue: a CUDA call
that never returns stops the pings, and systemd restarts the service.
"""

from __future__ import annotations

import asyncio
import faulthandler
import gc
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import uvicorn

from appliance.core.config import Config
from appliance.core.tls import tls_context
from appliance.engine.engine import Engine
from appliance.ops.lock import service_lock
from appliance.runtime.connections import (
    ConnectionGuard,
    ConnectionLimits,
    protocol_class,
    raise_open_file_limit,
)
from appliance.runtime.notify import Notifier

log = logging.getLogger(__name__)

TICK_SECONDS = 0.25


class Supervisor:
    def __init__(self, server: uvicorn.Server, engine: Engine, config: Config, notifier: Notifier,
                 address: str):
        self.server = server
        self.engine = engine
        self.config = config
        self.notifier = notifier
        self.address = address
        self.fatal: str | None = None
        self._stalled = False
        self._last_ping = 0.0

    async def run(self) -> None:
        while not self.server.started:
            if self.server.should_exit:
                return
            await asyncio.sleep(TICK_SECONDS / 5)
        if not await self._until_ready(self.engine):
            return
        while not self.server.should_exit:
            self._watch(self.engine)
            await asyncio.sleep(TICK_SECONDS)

    async def _until_ready(self, engine: Engine) -> bool:
        while not self.server.should_exit:
            if engine.ready:
                # Until systemd has it, it would go on waiting: try again next tick.
                if self.notifier.active and not self.notifier.send(
                        "READY=1", f"STATUS=ready on {self.address}"):
                    await asyncio.sleep(TICK_SECONDS)
                    continue
                log.info("ready: serving on %s", self.address, extra={"event": "service.ready"})
                # What startup made (the model, torch, the app: millions of objects) lives
                # as long as the process: out of the collector's sight, a full collection
                # no longer walks them all, a pause of tens of milliseconds mid-request.
                gc.freeze()
                return True
            if engine.load_error is not None:
                message = f"the model could not be loaded: {engine.load_error}"
                self.notifier.send(f"STATUS={message}")
                if self.notifier.active:
                    # Under systemd, exit with an error: its restart policy and start
                    # limit then apply, instead of a start that never completes.
                    self.fatal = message
                    self.server.should_exit = True
                return False
            await asyncio.sleep(TICK_SECONDS / 5)
        return False

    def _watch(self, engine: Engine) -> None:
        reason = engine.worker_problem(self.config.health.worker_stall_seconds)
        healthy = reason is None
        if not healthy and not self._stalled:
            self._stalled = True
            consequence = ("; withholding the watchdog so that systemd restarts the service"
                           if self.notifier.watchdog_seconds else "")
            log.error("%s%s", reason, consequence, extra={"event": "service.stalled"})
            self.notifier.send(f"STATUS={reason}")
        elif healthy and self._stalled:
            self._stalled = False
            log.info("the engine workers are back", extra={"event": "service.recovered"})
            self.notifier.send(f"STATUS=ready on {self.address}")
        period = self.notifier.watchdog_seconds
        now = time.monotonic()
        if healthy and period and now - self._last_ping >= period / 2:
            self.notifier.send("WATCHDOG=1")
            self._last_ping = now


class NotifyingServer(uvicorn.Server):
    """Says STOPPING=1 the moment shutdown begins: after a signal, uvicorn ends
    the process by re-raising it, before any code after serve() could run."""

    def __init__(self, config: uvicorn.Config, notifier: Notifier, stopping: threading.Event):
        super().__init__(config)
        self.notifier = notifier
        self.stopping = stopping

    async def shutdown(self, sockets=None) -> None:
        self.notifier.send("STOPPING=1", "STATUS=stopping")
        # Before uvicorn waits for open responses: the event streams end now.
        self.stopping.set()
        await super().shutdown(sockets)


def uvicorn_config(app: Callable[..., Any], host: str, port: int,
                   guard: ConnectionGuard) -> uvicorn.Config:
    limits = guard.limits
    # log_config=None: uvicorn's records go through the root logger's format.
    # ws="none": the app has no WebSocket routes, so an upgrade request is plain HTTP.
    # access_log=False: the app writes its own (web/access_log.py).
    # No limit_concurrency: it answers 503 to every request once that many
    # connections are open, idle ones included; the guard's cap displaces those.
    return uvicorn.Config(app, host=host, port=port, log_config=None,
                          timeout_graceful_shutdown=30, http=protocol_class(guard), ws="none",
                          access_log=False,
                          backlog=limits.backlog, timeout_keep_alive=limits.keep_alive)


def _log_limits(limits: ConnectionLimits, open_files: int) -> None:
    lowered = (f" (server.max_connections {limits.lowered_from}, lowered to fit the process's"
               f" limit of {open_files} open files)" if limits.lowered_from else "")
    log.info("connections: at most %d open%s; headers due within %g s, bodies within %g s;"
             " clients that read nothing for %g s and idle connections after %d s are closed",
             limits.max_connections, lowered, limits.header_timeout, limits.body_timeout,
             limits.send_timeout, limits.keep_alive, extra={"event": "service.connections"})


def run_service(config: Config, host: str, port: int) -> int:
    # Before anything starts: a certificate that cannot be used is a config error.
    tls = tls_context(config)
    # A watchdog timeout sends SIGABRT: the journal then shows where every thread was stuck.
    faulthandler.enable()
    notifier = Notifier.from_environment()
    open_files = raise_open_file_limit()
    limits = ConnectionLimits.fitting(config.server, open_files)
    with service_lock(config.storage.data_dir, "start the service"):
        # Imported under the lock: a refused second start loads no model code.
        from appliance.services import Services
        from appliance.web.app import create_app

        services = Services.build(config)
        app = create_app(services)
        _log_limits(limits, open_files)
        server = NotifyingServer(uvicorn_config(app, host, port, ConnectionGuard(limits, tls)),
                                 notifier, services.stopping)
        scheme = "https" if tls else "http"
        supervisor = Supervisor(server, services.engine, config, notifier,
                                f"{scheme}://{host}:{port}")

        async def serve() -> None:
            watching = asyncio.create_task(supervisor.run())
            try:
                await server.serve()
            finally:
                watching.cancel()
                await asyncio.gather(watching, return_exceptions=True)

        with asyncio.Runner(loop_factory=server.config.get_loop_factory()) as runner:
            runner.run(serve())
    if supervisor.fatal:
        log.error("stopped: %s", supervisor.fatal)
        return 1
    return 0
