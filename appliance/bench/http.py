"""`appliance bench-api`: what the HTTP API itself costs, beside a bare Litestar route.

A real `appliance serve` (the config's settings, its data in a temporary
folder, no per-key rate limit) and, in a process of its own, a bare Litestar
route under uvicorn answering the same JSON body (bare.py). wrk loads each
route from one thread with `connections` connections for `seconds`, `rounds`
times in a rotating order, each load right after one of the bare route's; a
route's ratio is the median of the ratios within those pairs (a shared
machine's speed drifts by a third within a minute: a pair is measured at one
speed, where the median of each route's own rounds compared loads made at
different ones). The routes:

- the appliance's `/healthz`,
- an authenticated `GET /api/playground/images/{jobId}` of a finished 2-image job,
- an authenticated download of one of its PNGs.

Then `posts` requests of 100 prompts each are sent one after the other and timed
(each job is cancelled at once, so the engine stays idle). Figures: requests/s
and latency p50/p99 of each, the ratio of each to the bare route, the server's
CPU time a request (the steadier figure where other machines share the CPU),
the POSTs' latency p50/p95.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
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
    requests: int = 0
    # CPU time the server process spent a request meanwhile; None where it cannot be read.
    cpu_us_per_request: float | None = None


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
    requests = re.search(r"(\d+) requests in", output)
    return Load(float(rate[1]), _milliseconds(p50[1]), _milliseconds(p99[1]),
                errors + (int(non_2xx[1]) if non_2xx else 0),
                int(requests[1]) if requests else 0)


@dataclass(frozen=True)
class Target:
    """A route wrk loads, and the process that answers it."""

    url: str
    pid: int
    headers: dict[str, str]


def load(target: Target, seconds: int, connections: int) -> Load:
    command = ["wrk", "--threads", "1", "--connections", str(connections),
               "--duration", f"{seconds}s", "--latency", target.url]
    for name, value in target.headers.items():
        command += ["--header", f"{name}: {value}"]
    cpu_before = serving.cpu_seconds(target.pid)
    done = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 60)
    cpu_after = serving.cpu_seconds(target.pid)
    if done.returncode != 0:
        raise RuntimeError(f"wrk failed: {done.stderr.strip()}")
    figure = parse_wrk(done.stdout)
    if cpu_before is None or cpu_after is None or not figure.requests:
        return figure
    return replace(figure,
                   cpu_us_per_request=(cpu_after - cpu_before) / figure.requests * 1e6)


def median_load(rounds: list[Load]) -> Load:
    """Each figure's median over the rounds."""
    def middle(values: list[float]) -> float:
        return serving.percentile(values, 0.50)

    cpu = [r.cpu_us_per_request for r in rounds if r.cpu_us_per_request is not None]
    return Load(middle([r.requests_per_second for r in rounds]),
                middle([r.p50_ms for r in rounds]), middle([r.p99_ms for r in rounds]),
                sum(r.errors for r in rounds), sum(r.requests for r in rounds),
                middle(cpu) if len(cpu) == len(rounds) else None)


def load_in_pairs(baseline: Target, targets: dict[str, Target], seconds: int,
                  connections: int, rounds: int) -> dict[str, list[tuple[Load, Load]]]:
    """Every target loaded `rounds` times, each load right after one of the baseline's:
    (baseline, target) pairs. A ratio is taken within its pair, under one speed of the
    machine; round r starts at the r-th target and wraps."""
    names = list(targets)
    pairs: dict[str, list[tuple[Load, Load]]] = {name: [] for name in names}
    for turn in range(rounds):
        for name in names[turn % len(names):] + names[:turn % len(names)]:
            before = load(baseline, seconds, connections)
            pairs[name].append((before, load(targets[name], seconds, connections)))
    return pairs


def paired_ratios(pairs: list[tuple[Load, Load]]) -> tuple[float, float | None]:
    """The median over the pairs of the target's rate over the baseline's, and of the
    baseline's CPU time a request over the target's (None where it could not be read)."""
    rates = [figure.requests_per_second / base.requests_per_second for base, figure in pairs]
    cpu = [_cpu_ratio(base, figure) for base, figure in pairs]
    known = [ratio for ratio in cpu if ratio is not None]
    return (serving.percentile(rates, 0.50),
            serving.percentile(known, 0.50) if len(known) == len(cpu) else None)


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


def run_api_benchmark(config: Config, seconds: int, connections: int, posts: int,
                      rounds: int = 3) -> dict[str, Any]:
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
            pid = server.process.pid
            baseline = Target(bare_url, bare.pid, {})
            pairs = load_in_pairs(baseline, {
                "healthz": Target(f"{server.base}/healthz", pid, {}),
                "job_read": Target(f"{server.base}{URL}/{job['jobId']}", pid, auth),
                # The job answers each image's URL whole, host included.
                "image_download": Target(job["images"][0]["url"], pid, auth),
            }, seconds, connections, rounds)
            post_seconds = time_posts(http, posts)
    finally:
        if bare is not None:
            bare.terminate()
            bare.wait(30)
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
    bare_loads = [base for runs in pairs.values() for base, _ in runs]
    loads = {"bare_route": {**vars(median_load(bare_loads)), "ratio": 1.0, "cpu_ratio": 1.0,
                            "rounds_requests_per_second": [r.requests_per_second
                                                           for r in bare_loads]}}
    for name, runs in pairs.items():
        ratio, cpu_ratio = paired_ratios(runs)
        loads[name] = {**vars(median_load([figure for _, figure in runs])),
                       "ratio": ratio, "cpu_ratio": cpu_ratio,
                       "rounds_requests_per_second": [f.requests_per_second for _, f in runs]}
    return {
        "seconds": seconds,
        "connections": connections,
        "rounds": rounds,
        "loads": loads,
        "post_100_prompts_p50_ms": serving.percentile(post_seconds, 0.50) * 1000,
        "post_100_prompts_p95_ms": serving.percentile(post_seconds, 0.95) * 1000,
        "posts": posts,
    }


def _cpu_ratio(baseline: Load, figure: Load) -> float | None:
    """The bare route's CPU time a request over this one's: comparable to the rate's ratio."""
    if baseline.cpu_us_per_request is None or not figure.cpu_us_per_request:
        return None
    return baseline.cpu_us_per_request / figure.cpu_us_per_request


LABELS = {"bare_route": "bare Litestar route (baseline)", "healthz": "/healthz",
          "job_read": "GET job (authenticated)", "image_download": "GET image (authenticated)"}


def report_lines(result: dict[str, Any]) -> list[str]:
    lines = [f"wrk: 1 thread, {result['connections']} connections, {result['seconds']} s each,"
             f" {result['rounds']} rounds, each route right after the bare route; the median"
             " of each figure, and of the ratios within those pairs"]
    for name, figure in result["loads"].items():
        cpu = ("" if figure["cpu_us_per_request"] is None else
               f", CPU {figure['cpu_us_per_request']:.0f} us a request"
               f" ({figure['cpu_ratio']:.2f}x)")
        lines.append(f"{LABELS[name]}: {figure['requests_per_second']:.0f} requests/s"
                     f" ({figure['ratio']:.2f}x), p50 {figure['p50_ms']:.1f} ms,"
                     f" p99 {figure['p99_ms']:.1f} ms{cpu}, {figure['errors']} errors")
    lines.append(f"POST of {PROMPTS_PER_POST} prompts, {result['posts']} one after another:"
                 f" p50 {result['post_100_prompts_p50_ms']:.1f} ms,"
                 f" p95 {result['post_100_prompts_p95_ms']:.1f} ms")
    return lines
