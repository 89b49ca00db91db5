"""Prometheus figures of every request: counts, durations and errors by method, route and status.

The series are those of Litestar's Prometheus plugin, which this replaced
(`appliance_http_requests_total`, `..._request_duration_seconds`,
`..._requests_in_progress`, `..._requests_error_total`; labels `method`,
`path` as the route's template, `status_code`, `app_name`), so dashboards
built on them keep working. The plugin cost about a seventh of a status poll:
per request it builds a Request and two label dicts and asks prometheus_client
for each series' child, under its lock, five times. Here each label set's
children are looked up once and kept.
"""

from __future__ import annotations

import time
from typing import Any

from litestar.enums import ScopeType
from litestar.middleware import ASGIMiddleware
from litestar.types import ASGIApp, Message, Receive, Scope, Send
from prometheus_client import Counter, Gauge, Histogram

APP_NAME = "appliance"
LABELS = ("method", "path", "status_code", "app_name")

REQUESTS = Counter("appliance_http_requests_total", "Total requests", LABELS)
DURATION = Histogram("appliance_http_request_duration_seconds", "Request duration, in seconds",
                     LABELS)
IN_PROGRESS = Gauge("appliance_http_requests_in_progress", "Total requests currently in progress",
                    LABELS, multiprocess_mode="livesum")
ERRORS = Counter("appliance_http_requests_error_total", "Total errors in requests", LABELS)

# What a request that raised past every handler is counted as: the server answers 500.
UNANSWERED = 500


class HttpMetricsMiddleware(ASGIMiddleware):
    scopes = (ScopeType.HTTP,)

    def __init__(self) -> None:
        # (method, route template) -> its in-progress gauge; the template is one
        # of the app's routes, so these stay as few as the routes.
        self._in_progress: dict[tuple[str, str], Any] = {}
        # (method, route template, status) -> its count, duration and error children.
        self._finished: dict[tuple[str, str, int], tuple[Any, Any, Any]] = {}

    def __deepcopy__(self, memo: dict) -> HttpMetricsMiddleware:
        # Litestar copies the app's middleware per route; one cache serves them all.
        return self

    async def handle(self, scope: Scope, receive: Receive, send: Send, next_app: ASGIApp) -> None:
        method, path = scope["method"], scope["path_template"]  # type: ignore[typeddict-item]
        in_progress = self._in_progress.get((method, path))
        if in_progress is None:
            in_progress = IN_PROGRESS.labels(method, path, 200, APP_NAME)
            self._in_progress[method, path] = in_progress
        status = UNANSWERED

        async def send_noting_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        started = time.perf_counter()
        in_progress.inc()
        try:
            await next_app(scope, receive, send_noting_status)
        finally:
            in_progress.dec()
            count, duration, errors = self._children(method, path, status)
            count.inc()
            duration.observe(time.perf_counter() - started)
            if errors is not None:
                errors.inc()

    def _children(self, method: str, path: str, status: int) -> tuple[Any, Any, Any]:
        children = self._finished.get((method, path, status))
        if children is None:
            labels = (method, path, status, APP_NAME)
            children = (REQUESTS.labels(*labels), DURATION.labels(*labels),
                        ERRORS.labels(*labels) if status >= 500 else None)
            self._finished[method, path, status] = children
        return children
