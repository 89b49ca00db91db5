"""A job's server-sent events, read by a real HTTP client from a real server."""

from __future__ import annotations

import json

import httpx

from .live_server import GatedGenerator, LiveServer, real_generator

URL = "/api/playground/images"


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


def test_events_report_queue_position_each_image_and_the_end(make_config):
    config = make_config(engine={"batch_size": 1})
    gated = GatedGenerator(real_generator(config))
    with LiveServer(config, load_generator=lambda: gated) as live:
        account, key = live.account_with_key(credits=6)
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
