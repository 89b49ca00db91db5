"""The services container: every service the front ends use, built once at startup.

The web app hands these to its handlers through Litestar's dependency
injection (web/app.py); nothing reaches for them through global state.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import anyio.to_thread

from appliance.accounts.service import AccountService, AuditService, KeyService, SignInService
from appliance.accounts.signin import SignInLimits
from appliance.core.config import Config
from appliance.core.database import ConnectionPool
from appliance.engine.engine import Engine
from appliance.engine.worker import ImageGenerator
from appliance.jobs.catalog import Catalog
from appliance.jobs.service import JobService
from appliance.jobs.shared_queue import SharedQueue
from appliance.ops.housekeeping import Housekeeping
from appliance.ops.scheduler import Scheduler


@dataclass(frozen=True)
class Services:
    config: Config
    database: ConnectionPool
    accounts: AccountService
    keys: KeyService
    audit: AuditService
    signin: SignInService
    jobs: JobService
    catalog: Catalog
    engine: Engine
    scheduler: Scheduler
    # Set when the server begins to shut down: open event streams then close,
    # instead of holding the shutdown until its grace time ends.
    stopping: threading.Event = field(default_factory=threading.Event)

    @classmethod
    def build(cls, config: Config,
              load_generator: Callable[[], ImageGenerator] | None = None,
              load_model: Callable[[str], ImageGenerator] | None = None) -> Services:
        """`load_generator` replaces the diffusers pipeline for every model, `load_model`
        per model (tests inject failures)."""
        database = ConnectionPool(config.storage.database, config.storage.busy_timeout_seconds)
        catalog = Catalog(config)
        engine = Engine(config, database, load_generator, catalog, load_model)
        return cls(
            config=config,
            database=database,
            accounts=AccountService(database),
            keys=KeyService(database),
            audit=AuditService(database),
            signin=SignInService(database, SignInLimits.from_config(config.console)),
            jobs=JobService(database, SharedQueue(database, config.engine.queue_capacity,
                                                  engine.queue)
                            if config.cluster_mode else engine.queue,
                            config.limits, config.images_dir),
            catalog=catalog,
            engine=engine,
            scheduler=Scheduler(Housekeeping(config, database)),
        )

    def start(self) -> None:
        """Starts the engine's workers and the housekeeping; call on the running event loop."""
        self.engine.start()
        self.scheduler.start()

    async def stop(self) -> None:
        # The scheduler's jobs and the engine's last batches end before the database closes.
        await self.scheduler.stop()
        self.engine.stop()
        # The keys' last uses noted in the last moments are written, unless the
        # database refuses them for longer than a write may wait.
        await anyio.to_thread.run_sync(self.keys.uses.wait,
                                       self.config.storage.busy_timeout_seconds)
        self.database.close()
