"""`appliance serve`: the HTTP server, and what it tells systemd.

READY=1 goes out once the server listens and the engine has loaded (and
warmed) the model. After that, WATCHDOG=1 goes out every half watchdog period,
but only while the engine worker keeps coming back to the queue: a CUDA call
that never returns stops the pings, and systemd restarts the service.
"""

from __future__ import annotations

import asyncio
import faulthandler
import logging
import threading
import time

import uvicorn

from appliance.core.config import Config
from appliance.engine.engine import Engine
from appliance.ops.lock import service_lock
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


def run_service(config: Config, host: str, port: int) -> int:
    # A watchdog timeout sends SIGABRT: the journal then shows where every thread was stuck.
    faulthandler.enable()
    notifier = Notifier.from_environment()
    with service_lock(config.storage.data_dir, "start the service"):
        # Imported under the lock: a refused second start loads no model code.
        from appliance.services import Services
        from appliance.web.app import create_app

        services = Services.build(config)
        app = create_app(services)
        # log_config=None: uvicorn's records go through the root logger's format.
        server = NotifyingServer(uvicorn.Config(app, host=host, port=port, log_config=None,
                                                timeout_graceful_shutdown=30), notifier,
                                 services.stopping)
        supervisor = Supervisor(server, services.engine, config, notifier, f"{host}:{port}")

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
