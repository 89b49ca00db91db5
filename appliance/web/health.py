"""/healthz, /readyz and /metrics: what a load balancer and Prometheus ask the service."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
from litestar import get
from litestar.response import Response
from prometheus_client import CONTENT_TYPE_LATEST

from appliance.core.config import Config
from appliance.core.database import ConnectionPool
from appliance.engine.engine import Engine
from appliance.engine.metrics import exposition
from appliance.web.dependencies import Database, EngineDependency, Settings


@dataclass(frozen=True)
class Check:
    name: str
    problem: str | None  # None: fine


MIB = 1024 * 1024


def database_check(database: ConnectionPool) -> Check:
    try:
        # A table read, which opens SQLite's file: "SELECT 1" never touches it.
        database.db().execute("SELECT 1 FROM accounts LIMIT 1").fetchone()
    except Exception as exc:  # noqa: BLE001 - any failure means not ready
        return Check("database", f"the database cannot be read: {exc}")
    return Check("database", database.write_probe.problem())


def existing_folder(folder: Path) -> Path:
    """`folder`, or its nearest parent that exists: where its disk can be measured."""
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder


def disk_check(config: Config) -> Check:
    """Enough room for new jobs and images on the disks of the data folder and the database."""
    least = config.health.min_free_disk_mb
    database = config.storage.database
    # In cluster mode the database's disk is the PostgreSQL server's, watched there.
    folders = [config.storage.data_dir] + ([database.parent] if isinstance(database, Path) else [])
    for folder in folders:
        free = shutil.disk_usage(existing_folder(folder)).free
        if free < least * MIB:
            return Check("disk", f"the disk of {folder} is (nearly) full: {free // MIB} MiB"
                                 f" free, below health.min_free_disk_mb ({least})")
    return Check("disk", None)


def model_check(engine: Engine) -> Check:
    if engine.load_error is not None:
        return Check("model", f"the model could not be loaded: {engine.load_error}")
    if engine.loading:
        return Check("model", "the model is still loading")
    return Check("model", None)


def worker_check(engine: Engine, stall_limit: float) -> Check:
    if engine.loading:
        return Check("worker", "the workers wait for the model")
    return Check("worker", engine.worker_problem(stall_limit))


@get("/healthz", include_in_schema=False, sync_to_thread=False)
def healthz() -> dict[str, str]:
    return {"status": "ok"}


# On the event loop: every check is quick and none waits for a lock, and a probe must
# answer when writes waiting for the database hold every request thread.
@get("/readyz", include_in_schema=False, sync_to_thread=False)
def readyz(database: Database, engine: EngineDependency,
           config: Settings) -> Response[dict[str, Any]]:
    checks = [database_check(database), disk_check(config), model_check(engine),
              worker_check(engine, config.health.worker_stall_seconds)]
    summary = {check.name: check.problem or "ok" for check in checks}
    problems = [check.problem for check in checks if check.problem]
    # Which models each worker holds: where a balancer or operator sees a swap.
    loaded = {worker.name: sorted(worker.models.names) for worker in engine.workers}
    if problems:
        return Response({"error": f"Not ready: {'; '.join(problems)}", "checks": summary,
                         "models_loaded": loaded},
                        status_code=503, headers={"Retry-After": "5"})
    return Response({"status": "ready", "checks": summary, "models_loaded": loaded})


# A thread of its own, one scrape at a time (reading the GPU's memory may be slow): a
# scrape must not queue behind requests holding the request threads while they wait
# for the database's write lock.
_SCRAPES = anyio.CapacityLimiter(1)


@get("/metrics", include_in_schema=False)
async def metrics(engine: EngineDependency) -> Response[bytes]:
    text = await anyio.to_thread.run_sync(exposition, engine.metrics.registry, limiter=_SCRAPES)
    return Response(text, media_type=CONTENT_TYPE_LATEST)
