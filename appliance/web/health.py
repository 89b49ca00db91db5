"""/readyz and /metrics: what a load balancer and Prometheus ask the service."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from litestar import Request, get
from litestar.response import Response
from prometheus_client import CONTENT_TYPE_LATEST

from appliance.engine.metrics import exposition


@dataclass(frozen=True)
class Check:
    name: str
    problem: str | None  # None: fine


def database_check(state: Any) -> Check:
    try:
        state.database.db().execute("SELECT 1").fetchone()
    except Exception as exc:  # noqa: BLE001 - any failure means not ready
        return Check("database", f"the database cannot be read: {exc}")
    return Check("database", None)


def model_check(state: Any) -> Check:
    engine = state.engine
    if engine.load_error is not None:
        return Check("model", f"the model could not be loaded: {engine.load_error}")
    if not all(worker.ready.is_set() for worker in engine.workers):
        return Check("model", "the model is still loading")
    return Check("model", None)


def worker_problem(engine: Any, stall_limit: float) -> str | None:
    """Why the engine's workers cannot take work, or None while they come back to the queue."""
    if not all(worker.is_alive() for worker in engine.workers):
        return "an engine worker has stopped"
    stalled = time.monotonic() - engine.heartbeat
    if stalled > stall_limit:
        return (f"an engine worker has not come back for {stalled:.0f} s (limit"
                f" {stall_limit:.0f} s): a batch is hung")
    return None


def worker_check(state: Any) -> Check:
    engine = state.engine
    if not all(worker.ready.is_set() for worker in engine.workers):
        return Check("worker", "the workers wait for the model")
    return Check("worker", worker_problem(engine, state.config.health.worker_stall_seconds))


def readiness(state: Any) -> list[Check]:
    return [database_check(state), model_check(state), worker_check(state)]


@get("/readyz", include_in_schema=False, sync_to_thread=True)
def readyz(request: Request) -> Response[dict[str, Any]]:
    checks = readiness(request.app.state)
    summary = {check.name: check.problem or "ok" for check in checks}
    problems = [check.problem for check in checks if check.problem]
    if problems:
        return Response({"error": f"Not ready: {'; '.join(problems)}", "checks": summary},
                        status_code=503, headers={"Retry-After": "5"})
    return Response({"status": "ready", "checks": summary})


@get("/metrics", include_in_schema=False, sync_to_thread=True)
def metrics(request: Request) -> Response[bytes]:
    return Response(exposition(request.app.state.metrics_registry),
                    media_type=CONTENT_TYPE_LATEST)
