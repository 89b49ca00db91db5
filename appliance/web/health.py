"""/healthz, /readyz and /metrics: what a load balancer and Prometheus ask the service."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from litestar import get
from litestar.response import Response
from prometheus_client import CONTENT_TYPE_LATEST

from appliance.core.database import ConnectionPool
from appliance.engine.engine import Engine
from appliance.engine.metrics import exposition
from appliance.web.dependencies import Database, EngineDependency, Settings


@dataclass(frozen=True)
class Check:
    name: str
    problem: str | None  # None: fine


def database_check(database: ConnectionPool) -> Check:
    try:
        database.db().execute("SELECT 1").fetchone()
    except Exception as exc:  # noqa: BLE001 - any failure means not ready
        return Check("database", f"the database cannot be read: {exc}")
    return Check("database", None)


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


@get("/readyz", include_in_schema=False, sync_to_thread=True)
def readyz(database: Database, engine: EngineDependency,
           config: Settings) -> Response[dict[str, Any]]:
    checks = [database_check(database), model_check(engine),
              worker_check(engine, config.health.worker_stall_seconds)]
    summary = {check.name: check.problem or "ok" for check in checks}
    problems = [check.problem for check in checks if check.problem]
    if problems:
        return Response({"error": f"Not ready: {'; '.join(problems)}", "checks": summary},
                        status_code=503, headers={"Retry-After": "5"})
    return Response({"status": "ready", "checks": summary})


@get("/metrics", include_in_schema=False, sync_to_thread=True)
def metrics(engine: EngineDependency) -> Response[bytes]:
    return Response(exposition(engine.metrics.registry), media_type=CONTENT_TYPE_LATEST)
