"""Prometheus figures of every request: counts, durations and errors by method, route and status.

The series are those of Litestar's Prometheus plugin, which this replaced
(`appliance_http_requests_total`, `..._request_duration_seconds`,
`..._requests_in_progress`, `..._requests_error_total`; labels `method`,
`path` as the route's template, `status_code`, `app_name`), so dashboards
built on them keep working.

Counted here in plain numbers and handed to prometheus_client only when
/metrics is read (HttpCollector): its own counters take a lock for every
change, five a request, which cost a sixteenth of a status poll. The numbers
change on the serving event loop's thread alone (ASGI middleware runs
there); a scrape from another thread reads them as they stand, each bucket
list copied in one step so a histogram's count and buckets agree.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from litestar.enums import ScopeType
from litestar.middleware import ASGIMiddleware
from litestar.types import ASGIApp, Message, Receive, Scope, Send
from prometheus_client import REGISTRY, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

APP_NAME = "appliance"
LABELS = ("method", "path", "status_code", "app_name")
# prometheus_client's default buckets, as the plugin had them; +Inf last.
BOUNDS = Histogram.DEFAULT_BUCKETS

# What a request that raised past every handler is counted as: the server answers 500.
UNANSWERED = 500


@dataclass
class _Finished:
    """The requests of one (method, route, status): when first seen, how many took at most
    each bound (not cumulative: one bucket a request), and their total seconds."""

    created: float = field(default_factory=time.time)
    buckets: list[int] = field(default_factory=lambda: [0] * len(BOUNDS))
    seconds: float = 0.0


class HttpCounts:
    """Every request's figures, by label set; one for the process (all apps add to it)."""

    def __init__(self) -> None:
        self.in_progress: dict[tuple[str, str], int] = {}
        self.finished: dict[tuple[str, str, int], _Finished] = {}

    def started(self, method: str, path: str) -> None:
        key = (method, path)
        self.in_progress[key] = self.in_progress.get(key, 0) + 1

    def ended(self, method: str, path: str, status: int, seconds: float) -> None:
        self.in_progress[method, path] -= 1
        finished = self.finished.get((method, path, status))
        if finished is None:
            finished = self.finished[method, path, status] = _Finished()
        finished.buckets[bisect.bisect_left(BOUNDS, seconds)] += 1
        finished.seconds += seconds


COUNTS = HttpCounts()


class HttpCollector(Collector):
    """HttpCounts as Prometheus series, made when /metrics is read."""

    def __init__(self, counts: HttpCounts) -> None:
        self.counts = counts

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily | HistogramMetricFamily]:
        requests = CounterMetricFamily("appliance_http_requests", "Total requests",
                                       labels=LABELS)
        errors = CounterMetricFamily("appliance_http_requests_error", "Total errors in requests",
                                     labels=LABELS)
        durations = HistogramMetricFamily("appliance_http_request_duration_seconds",
                                          "Request duration, in seconds", labels=LABELS)
        in_progress = GaugeMetricFamily("appliance_http_requests_in_progress",
                                        "Total requests currently in progress", labels=LABELS)
        for (method, path), count in list(self.counts.in_progress.items()):
            in_progress.add_metric((method, path, "200", APP_NAME), count)
        for (method, path, status), finished in list(self.counts.finished.items()):
            labels = (method, path, str(status), APP_NAME)
            buckets = list(finished.buckets)  # one step: the count below matches them
            cumulative, total = [], 0
            for bound, count in zip(BOUNDS, buckets, strict=True):
                total += count
                cumulative.append((floatToGoString(bound), total))
            requests.add_metric(labels, total, created=finished.created)
            durations.add_metric(labels, cumulative, finished.seconds)
            if status >= 500:
                errors.add_metric(labels, total, created=finished.created)
        yield from (requests, durations, in_progress, errors)


REGISTRY.register(HttpCollector(COUNTS))


class HttpMetricsMiddleware(ASGIMiddleware):
    scopes = (ScopeType.HTTP,)

    def __init__(self, counts: HttpCounts = COUNTS) -> None:
        self.counts = counts

    def __deepcopy__(self, memo: dict) -> HttpMetricsMiddleware:
        # Litestar copies the app's middleware per route; all count in one place.
        return self

    async def handle(self, scope: Scope, receive: Receive, send: Send, next_app: ASGIApp) -> None:
        method, path = scope["method"], scope["path_template"]  # type: ignore[typeddict-item]
        status = UNANSWERED

        async def send_noting_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        started = time.perf_counter()
        self.counts.started(method, path)
        try:
            await next_app(scope, receive, send_noting_status)
        finally:
            self.counts.ended(method, path, status, time.perf_counter() - started)
