"""Every request is counted and timed by route template and status, errors apart."""

from __future__ import annotations

from litestar import Litestar, get
from litestar.params import FromPath
from litestar.testing import TestClient
from prometheus_client import REGISTRY

from appliance.web.http_metrics import HttpMetricsMiddleware


@get("/things/{thing_id:str}", sync_to_thread=False)
def thing(thing_id: FromPath[str]) -> dict[str, str]:
    if thing_id == "broken":
        raise RuntimeError("this handler fails")
    return {"id": thing_id}


def sample(name: str, path: str, status: int) -> float:
    value = REGISTRY.get_sample_value(name, {"app_name": "appliance", "method": "GET",
                                             "path": path, "status_code": str(status)})
    return value or 0.0


def test_requests_are_counted_by_template_with_their_status_and_duration():
    template = "/things/{thing_id}"
    counts = {status: sample("appliance_http_requests_total", template, status)
              for status in (200, 500)}
    errors = sample("appliance_http_requests_error_total", template, 500)
    timed = sample("appliance_http_request_duration_seconds_count", template, 200)
    app = Litestar(route_handlers=[thing], middleware=[HttpMetricsMiddleware()])
    with TestClient(app) as client:
        for thing_id in ("a", "b", "c"):
            assert client.get(f"/things/{thing_id}").status_code == 200
        assert client.get("/things/broken").status_code == 500

    # One series for the route, whatever ids were asked.
    assert sample("appliance_http_requests_total", template, 200) - counts[200] == 3
    assert sample("appliance_http_request_duration_seconds_count", template, 200) - timed == 3
    assert sample("appliance_http_requests_total", template, 500) - counts[500] == 1
    assert sample("appliance_http_requests_error_total", template, 500) - errors == 1
    assert sample("appliance_http_requests_total", "/things/a", 200) == 0
    # None is left in progress once the answers are sent.
    assert sample("appliance_http_requests_in_progress", template, 200) == 0
