"""A job's server-sent events, read by a real HTTP client from a real server."""

from __future__ import annotations

import json
import os
import re
import signal
import time

import httpx
import pytest

from appliance.core.clock import parse_utc
from appliance.engine.engine import STOP_TIMEOUT_SECONDS

from .live_server import GatedGenerator, LiveServer, real_generator
from .serve_process import ServeProcess, cli, write_config

URL = "/api/playground/images"
# An open stream looks for the shutdown four times a second; a few seconds allow for a
# loaded machine.
FEW_SECONDS = 5.0
# After the engine has stopped: the PNG writers, the database, the process's exit.
EXIT_SECONDS = 10.0
GIVE_UP_SECONDS = FEW_SECONDS + STOP_TIMEOUT_SECONDS + EXIT_SECONDS


def read_events(lines) -> list[tuple[str, dict]]:
    """Parses the stream by the text/event-stream rules the stream must follow."""
    events, name, data = [], None, []
    for line in lines:
        if line.startswith(":"):
            continue
        if line == "":
            if data:
                events.append((name or "message", json.loads("\n".join(data))))
            name, data = None, []
        elif line.startswith("event: "):
            name = line[len("event: "):]
        elif line.startswith("data: "):
            data.append(line[len("data: "):])
    return events


def logged_at(log: str, text: str) -> float:
    """The time (as time.time()) of the server's first log line that contains `text`."""
    line = next(line for line in log.splitlines() if text in line)
    return parse_utc(re.search(r"ts=(\S+)", line)[1]).timestamp()


def test_events_report_queue_position_each_image_and_the_end(make_config):
    config = make_config(engine={"batch_size": 1})
    gated = GatedGenerator(real_generator(config))
    with LiveServer(config, load_generator=lambda: gated) as live:
        _, key = live.account_with_key(credits=6)
        headers = {"Authorization": f"Bearer {key}"}
        ahead = httpx.post(live.url + URL, json={"prompts": ["a", "b"]}, headers=headers).json()
        assert gated.started.wait(30)  # image a is in the pipeline, b waits
        job = httpx.post(live.url + URL, json={"prompts": ["c", "d"], "seed": 5},
                         headers=headers).json()
        status = httpx.get(f"{live.url}{URL}/{job['jobId']}", headers=headers).json()
        assert (status["status"], status["queuePosition"]) == ("queued", 1)

        with httpx.stream("GET", f"{live.url}{URL}/{job['jobId']}/events", headers=headers,
                          timeout=60) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            gated.gate.set()
            # Returns only once the server closes the stream.
            events = read_events(response.iter_lines())

    names = [name for name, _ in events]
    assert names[-1] == "end" and names.count("end") == 1
    assert names.count("image") == 2
    images = [data for name, data in events if name == "image"]
    assert [(i["index"], i["status"], i["seed"]) for i in images] == [
        (0, "completed", 5), (1, "completed", 6)]
    assert all(i["url"].startswith(live.url) for i in images)
    progress = [data for name, data in events if name == "progress"]
    assert names[0] == "progress" and progress[0]["status"] == "queued"
    assert progress[-1]["status"] == "completed" and progress[-1]["completedImages"] == 2
    assert progress[-1]["queuePosition"] is None  # nothing of the job waits any more
    end = events[-1][1]
    assert end["jobId"] == job["jobId"] and end["status"] == "completed"
    assert end["parameters"]["seed"] == 5
    assert ahead["jobId"] != job["jobId"]


def test_first_event_gives_the_queue_position_and_others_get_a_plain_404(make_config):
    config = make_config(engine={"batch_size": 1})
    gated = GatedGenerator(real_generator(config))
    with LiveServer(config, load_generator=lambda: gated) as live:
        _, key = live.account_with_key(credits=6)
        _, other_key = live.account_with_key("other@example.com")
        headers = {"Authorization": f"Bearer {key}"}
        httpx.post(live.url + URL, json={"prompts": ["a", "b", "c"]}, headers=headers)
        assert gated.started.wait(30)
        job = httpx.post(live.url + URL, json={"prompts": ["d"]}, headers=headers).json()
        events_url = f"{live.url}{URL}/{job['jobId']}/events"
        foreign = httpx.get(events_url, headers={"Authorization": f"Bearer {other_key}"})
        assert (foreign.status_code, foreign.json()) == (404, {"error": "Job not found"})
        assert httpx.get(events_url).status_code == 401
        with httpx.stream("GET", events_url, headers=headers, timeout=60) as response:
            lines = response.iter_lines()
            assert next(lines) == "event: progress"
            first = json.loads(next(lines)[len("data: "):])
            assert (first["status"], first["queuePosition"], first["pendingImages"]) == (
                "queued", 2, 1)
            # Cancelling ends the stream: the cancelled image, the counts, the end.
            httpx.delete(f"{live.url}{URL}/{job['jobId']}", headers=headers)
            events = read_events(lines)
        gated.gate.set()
    assert [name for name, _ in events] == ["image", "progress", "end"]
    assert [data["status"] for _, data in events] == ["cancelled"] * 3
    assert events[1][1]["queuePosition"] is None and events[1][1]["cancelledImages"] == 1


@pytest.mark.system
def test_streams_close_when_the_service_stops_instead_of_holding_it_up(tmp_path, tiny_model,
                                                                       launcher):
    # The point is the process's shutdown: a real `appliance serve`.
    config = write_config(tmp_path, tiny_model, engine={"batch_size": 1})
    server = ServeProcess(config, tmp_path / "serve.log", launcher).start()
    cli(config, "accounts", "create", "dev@example.com", "--credits", "60", "--password-stdin",
        stdin="correct horse battery\n")
    key = cli(config, "keys", "create", "dev@example.com", "--name", "Test").splitlines()[-1]
    headers = {"Authorization": f"Bearer {key}"}
    # Far more work than the 30 s of grace uvicorn gives open responses.
    job = httpx.post(f"{server.url}{URL}", headers=headers, timeout=30, json={
        "prompts": [f"p{i}" for i in range(60)], "steps": 100}).json()

    lines = []
    with httpx.stream("GET", f"{server.url}{URL}/{job['jobId']}/events", headers=headers,
                      timeout=60) as stream:
        received = stream.iter_lines()
        for line in received:
            lines.append(line)
            if line == "event: image":
                break  # the stream is live and the work under way
        os.kill(server.pid, signal.SIGTERM)
        signalled_at, stopped_at = time.time(), time.monotonic()
        lines += list(received)
    closed_after = time.monotonic() - stopped_at
    while server.running:
        assert time.monotonic() - stopped_at < GIVE_UP_SECONDS, "the service did not stop"
        time.sleep(0.05)
    exited_after = time.monotonic() - stopped_at
    log = (tmp_path / "serve.log").read_text()
    shutdown_after = logged_at(log, "Waiting for application shutdown") - signalled_at

    names = [name for name, _ in read_events(lines)]
    assert "end" not in names and names[0] == "progress" and "image" in names
    assert closed_after < FEW_SECONDS, closed_after
    # uvicorn went on to the app's shutdown at once instead of waiting out its grace time...
    assert shutdown_after < FEW_SECONDS, shutdown_after
    # ...where the engine waits at most its bound for the image in the pipeline.
    assert exited_after < shutdown_after + STOP_TIMEOUT_SECONDS + EXIT_SECONDS, (
        exited_after, shutdown_after)
    assert "Application shutdown complete" in log
