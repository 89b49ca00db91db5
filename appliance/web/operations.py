"""What the running service adds for its operators: the scheduler and the metrics."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

from litestar import Litestar
from litestar.plugins.prometheus import PrometheusConfig

from appliance.engine.metrics import engine_registry
from appliance.ops.housekeeping import Clock, Housekeeping, utc_clock
from appliance.ops.scheduler import Scheduler

# Requests by route template (`/api/playground/images/{job_id:str}`), never by
# raw path: one series per route, whatever ids clients send.
HTTP_METRICS = PrometheusConfig(app_name="appliance", prefix="appliance_http", group_path=True)


def operations_lifespan(clock: Clock = utc_clock) -> Callable[[Litestar], Any]:
    """A lifespan to list after the one that opens the database and starts the engine."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        state = app.state
        state.metrics_registry = engine_registry(state.engine)
        scheduler = Scheduler(Housekeeping(state.config, state.database, clock))
        state.scheduler = scheduler
        scheduler.start()
        try:
            yield
        finally:
            await scheduler.stop()

    return lifespan
