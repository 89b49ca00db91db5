"""`appliance bench-api`: what the HTTP API itself costs, beside a bare Litestar route.

A real `appliance serve` (the config's settings, its data in a temporary
folder, no per-key rate limit) and, in a process of its own, a bare Litestar
route under uvicorn answering the same JSON body (bare.py). wrk loads each in
turn from one thread with `connections` connections for `seconds`:

- the bare route (the baseline),
- the appliance's `/healthz`,
- an authenticated `GET /api/playground/images/{jobId}` of a finished 2-image job,
- an authenticated download of one of its PNGs.

Then `posts` requests of 100 prompts each are sent one after the other and timed
(each job is cancelled at once, so the engine stays idle). Figures: requests/s
and latency p50/p99 of each, the ratio of each to the bare route, the POSTs'
latency p50/p95.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from appliance.bench import serving
from appliance.core.config import Config
from appliance.jobs.models import JobStatus

URL = "/api/playground/images"
PROMPTS_PER_POST = 100


@dataclass(frozen=True)
class Load:
    """One wrk run's figures."""

    requests_per_second: float
    p50_ms: float
    p99_ms: float
    errors: int


_UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}


def _milliseconds(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if match is None:
        raise RuntimeError(f"wrk printed a duration this benchmark cannot read: {text!r}")
    return float(match[1]) * _UNITS_MS[match[2]]


def parse_wrk(output: str) -> Load:
    rate = re.search(r"Requests/sec:\s+([\d.]+)", output)
    p50 = re.search(r"^\s+50%\s+(\S+)", output, re.M)
    p99 = re.search(r"^\s+99%\s+(\S+)", output, re.M)
    if not (rate and p50 and p99):
        raise RuntimeError(f"wrk printed no figures:\n{output[-2000:]}")
    errors = sum(int(n) for n in re.findall(r"(?:connect|read|write|timeout) (\d+)", output))
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    return Load(float(rate[1]), _milliseconds(p50[1]), _milliseconds(p99[1]),
                errors + (int(non_2xx[1]) if non_2xx else 0))


def load(url: str, seconds: int, connections: int, headers: dict[str, str]) -> Load:
    command = ["wrk", "--threads", "1", "--connections", str(connections),
               "--duration", f"{seconds}s", "--latency", url]
    for name, value in headers.items():
        command += ["--header", f"{name}: {value}"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 60)
    if done.returncode != 0:
        raise RuntimeError(f"wrk failed: {done.stderr.strip()}")
    return parse_wrk(done.stdout)


def _finished_job(http: httpx.Client, prompts: list[str]) -> dict[str, Any]:
    job_id = http.post(URL, json={"prompts": prompts}).raise_for_status().json()["jobId"]
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        job = http.get(f"{URL}/{job_id}").raise_for_status().json()
        if JobStatus(job["status"]).finished:
            if job["completedImages"] != len(prompts):
                raise RuntimeError(f"the job's images were not all made: {job}")
            return dict(job)
        time.sleep(0.2)
    raise RuntimeError("the job did not finish within 600 s")


def time_posts(http: httpx.Client, count: int) -> list[float]:
    """Seconds each of `count` 100-prompt POSTs took; each job is cancelled after."""
    taken = []
    for index in range(count):
        body = {"prompts": [f"prompt {index}-{n}" for n in range(PROMPTS_PER_POST)]}
        started = time.perf_counter()
        answer = http.post(URL, json=body)
        taken.append(time.perf_counter() - started)
        http.delete(f"{URL}/{answer.raise_for_status().json()['jobId']}").raise_for_status()
    return taken


def server_config(config: Config, work: Path, port: int, credits: int) -> dict[str, Any]:
    generation = config.generation
    return {
        "server": {"host": "127.0.0.1", "port": port},
        "storage": {"data_dir": str(work / "data"),
                    "database": str(work / "data" / "appliance.db")},
        "model": {"path": str(config.model.path), "device": config.model.device},
        "generation": {"width": generation.min_size, "height": generation.min_size,
                       "steps": generation.min_steps},
        "limits": {"requests_per_minute_per_key": 0,
                   "max_pending_images_per_account": credits},
        "engine": {"queue_capacity": max(config.engine.queue_capacity, credits)},
    }


def run_api_benchmark(config: Config, seconds: int, connections: int,
                      posts: int) -> dict[str, Any]:
    if shutil.which("wrk") is None:
        raise RuntimeError("wrk is not installed (Debian's wrk package)")
    work = Path(tempfile.mkdtemp(prefix="appliance-bench-api-"))
    credits = PROMPTS_PER_POST * (posts + 1) + 10
    port, bare_port = serving.free_port(), serving.free_port()
    config_path = work / "config.toml"
    serving.write_config(config_path, server_config(config, work, port, credits))
    (work / "data").mkdir()
    (key,) = serving.make_keys(work / "data" / "appliance.db", 1, credits=credits)
    server = serving.Server(config_path, port, work / "serve.log")
    bare: subprocess.Popen[bytes] | None = None
    auth = {"Authorization": f"Bearer {key}"}
    try:
        server.wait_until_up(600)
        with httpx.Client(base_url=server.base, headers=auth, timeout=120) as http:
            job = _finished_job(http, ["a lighthouse", "a red fox"])
            body_file = work / "job.json"
            body_file.write_text(json.dumps(job))
            bare = subprocess.Popen([sys.executable, "-m", "appliance.bench.bare",
                                     str(bare_port), str(body_file)])
            bare_url = f"http://127.0.0.1:{bare_port}/job"
            if not serving.answers_ok(bare_url, lambda: bare.poll() is None, 60):
                raise RuntimeError("the bare Litestar app did not start")
            figures = {
                "bare_route": load(bare_url, seconds, connections, {}),
                "healthz": load(f"{server.base}/healthz", seconds, connections, {}),
                "job_read": load(f"{server.base}{URL}/{job['jobId']}", seconds, connections,
                                 auth),
                # The job answers each image's URL whole, host included.
                "image_download": load(job["images"][0]["url"], seconds, connections, auth),
            }
            post_seconds = time_posts(http, posts)
    finally:
        if bare is not None:
            bare.terminate()
            bare.wait(30)
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
    baseline = figures["bare_route"].requests_per_second
    return {
        "seconds": seconds,
        "connections": connections,
        "loads": {name: {**vars(figure),
                         "ratio": figure.requests_per_second / baseline}
                  for name, figure in figures.items()},
        "post_100_prompts_p50_ms": serving.percentile(post_seconds, 0.50) * 1000,
        "post_100_prompts_p95_ms": serving.percentile(post_seconds, 0.95) * 1000,
        "posts": posts,
    }


LABELS = {"bare_route": "bare Litestar route (baseline)", "healthz": "/healthz",
          "job_read": "GET job (authenticated)", "image_download": "GET image (authenticated)"}


def report_lines(result: dict[str, Any]) -> list[str]:
    lines = [f"wrk: 1 thread, {result['connections']} connections, {result['seconds']} s each"]
    for name, figure in result["loads"].items():
        lines.append(f"{LABELS[name]}: {figure['requests_per_second']:.0f} requests/s"
                     f" ({figure['ratio']:.2f}x), p50 {figure['p50_ms']:.1f} ms,"
                     f" p99 {figure['p99_ms']:.1f} ms, {figure['errors']} errors")
    lines.append(f"POST of {PROMPTS_PER_POST} prompts, {result['posts']} one after another:"
                 f" p50 {result['post_100_prompts_p50_ms']:.1f} ms,"
                 f" p95 {result['post_100_prompts_p95_ms']:.1f} ms")
    return lines
