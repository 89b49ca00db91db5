"""The benchmark's appliance side: a real `appliance serve`, loaded over HTTP.

Several clients, each with an account and key of its own, submit their bulk
jobs at once and poll them until done. The clock runs from the first request
to the moment the last job is seen finished, with every PNG on disk.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from appliance.accounts import accounts, audit, keys
from appliance.core.clock import parse_utc
from appliance.core.database import ConnectionPool
from appliance.core.database_url import DatabaseUrl
from appliance.jobs.models import ImageStatus, JobStatus

URL = "/api/playground/images"
PEAK_MEMORY = re.compile(r"peak GPU memory on (cuda:\d+): ([\d.]+) GiB allocated")


@dataclass
class ClientRun:
    key: str
    jobs: list[list[str]]
    submitted: dict[str, float] = field(default_factory=dict)
    finished: dict[str, dict[str, Any]] = field(default_factory=dict)
    seen_done_at: float = 0.0
    error: BaseException | None = None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def answers_ok(url: str, alive: Callable[[], bool], timeout: float,
               interval: float = 0.2) -> bool:
    """Polls `url` until it answers 200: True; False once `alive()` is false or time runs out."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return True
        except httpx.TransportError:
            pass
        if not alive() or time.monotonic() > deadline:
            return False
        time.sleep(interval)


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    # JSON's string escapes are valid in TOML's basic strings.
    return json.dumps(str(value))


def write_config(path: Path, sections: dict[str, dict[str, Any]]) -> None:
    lines = []
    for name, values in sections.items():
        lines.append(f"[{name}]")
        lines += [f"{key} = {toml_value(value)}" for key, value in values.items()]
        lines.append("")
    path.write_text("\n".join(lines))


def throwaway_password() -> str:
    """A benchmark account's password: never used, and never the same twice."""
    return secrets.token_urlsafe(24)


def make_keys(database: Path | DatabaseUrl, count: int, credits: int,
              email: str = "bench{index}@example.com") -> list[str]:
    """`count` accounts with `credits` each and a key each (`email` names them, with
    {index}); the keys."""
    pool = ConnectionPool(database)
    try:
        db = pool.db()
        made = []
        for index in range(count):
            account = accounts.create_account(db, email.format(index=index),
                                              throwaway_password(), audit.Actor.cli(),
                                              credits=credits)
            made.append(keys.create_key(db, account.id, "Benchmark", audit.Actor.cli())[1])
        return made
    finally:
        pool.close()


class Server:
    def __init__(self, config_path: Path, port: int, log_path: Path):
        self.base = f"http://127.0.0.1:{port}"
        self.log_path = log_path
        with log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "appliance", "serve", "--config", str(config_path)],
                stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def wait_until_up(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        if not answers_ok(f"{self.base}/healthz", lambda: self.process.poll() is None, timeout):
            self._check_alive(deadline)

    def wait_until_generating(self, key: str, timeout: float) -> None:
        """One image through the whole path: the model is loaded and warmed up."""
        deadline = time.monotonic() + timeout
        with httpx.Client(base_url=self.base, headers=_bearer(key), timeout=60) as http:
            response = http.post(URL, json={"prompts": ["warm-up"]})
            response.raise_for_status()
            job_id = response.json()["jobId"]
            while True:
                job = http.get(f"{URL}/{job_id}").json()
                if job["status"] == JobStatus.COMPLETED:
                    return
                if JobStatus(job["status"]).finished:
                    raise RuntimeError(f"the warm-up image did not generate: {job}")
                self._check_alive(deadline)
                time.sleep(0.2)

    def _check_alive(self, deadline: float) -> None:
        if self.process.poll() is not None:
            raise RuntimeError(f"the server stopped:\n{self._log_tail()}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"the server was not ready in time:\n{self._log_tail()}")

    def _log_tail(self) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-30:])

    def stop(self) -> str:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=120)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.log_path.read_text(errors="replace")


def _bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _client(base: str, run: ClientRun, start: threading.Barrier, images_dir: Path,
            poll_seconds: float) -> None:
    try:
        with httpx.Client(base_url=base, headers=_bearer(run.key), timeout=120) as http:
            start.wait()
            for prompts in run.jobs:
                while True:
                    submitted_at = time.perf_counter()
                    response = http.post(URL, json={"prompts": prompts})
                    if response.status_code not in (429, 503):
                        break
                    time.sleep(float(response.headers.get("Retry-After", "1")))
                response.raise_for_status()
                run.submitted[response.json()["jobId"]] = submitted_at
            # An account's jobs finish in the order they were queued, so each
            # client watches its oldest unfinished job only: one request at a
            # time, which leaves the server's CPU to the work being measured.
            waiting = list(run.submitted)
            while waiting:
                job = http.get(f"{URL}/{waiting[0]}").json()
                if not JobStatus(job["status"]).finished:
                    time.sleep(poll_seconds)
                    continue
                run.finished[waiting.pop(0)] = job
            # Done means on disk: each PNG exists before the clock stops.
            for job_id, job in run.finished.items():
                for image in job["images"]:
                    if image["status"] == ImageStatus.COMPLETED:
                        path = images_dir / job_id / f"{image['index']}.png"
                        if not path.is_file():
                            raise RuntimeError(f"{path} is missing though the job says completed")
            run.seen_done_at = time.perf_counter()
    except BaseException as exc:  # noqa: BLE001 - reported by the benchmark
        run.error = exc
        start.abort()



def percentile(values: list[float], fraction: float) -> float:
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[round(fraction * 100) - 1]


def drive(server: Server, runs: list[ClientRun], images_dir: Path,
          poll_seconds: float = 1.0) -> dict[str, Any]:
    """Lets the clients loose at once; figures from the first request to the last PNG.

    Each client asks for its oldest unfinished job every `poll_seconds`, as the
    README's examples do every second. On a CPU that the model also needs,
    frequent polling costs the generation far more than the requests' own work:
    a request preempts one of the threads a torch operation is split over, and
    the others wait for it.
    """
    start = threading.Barrier(len(runs) + 1)
    threads = [threading.Thread(target=_client,
                                args=(server.base, run, start, images_dir, poll_seconds),
                                name=f"bench-client-{index}")
               for index, run in enumerate(runs)]
    for thread in threads:
        thread.start()
    start.wait()
    started, cpu_started = time.perf_counter(), cpu_seconds(server.process.pid)
    for thread in threads:
        thread.join()
    cpu_ended = cpu_seconds(server.process.pid)
    for run in runs:
        if run.error is not None:
            raise RuntimeError(f"a benchmark client failed: {run.error!r}") from run.error
    seconds = max(run.seen_done_at for run in runs) - started
    jobs = [job for run in runs for job in run.finished.values()]
    completed = sum(job["completedImages"] for job in jobs)
    # The server's own timestamps: exact, where polling would add up to poll_seconds.
    latencies = [(parse_utc(job["finishedAt"]) - parse_utc(job["createdAt"])).total_seconds()
                 for job in jobs]
    return {
        "images": sum(job["totalImages"] for job in jobs),
        "completed_images": completed,
        "failed_images": sum(job["failedImages"] for job in jobs),
        "seconds": seconds,
        "images_per_second": completed / seconds,
        "cpu_seconds": (None if cpu_started is None or cpu_ended is None
                        else cpu_ended - cpu_started),
        "jobs": len(jobs),
        "job_latency_p50_s": percentile(latencies, 0.50),
        "job_latency_p95_s": percentile(latencies, 0.95),
    }


def cpu_seconds(pid: int) -> float | None:
    """User and system CPU time a process has used, all threads (Linux); None elsewhere."""
    try:
        # The fields after the command's closing parenthesis start at the third.
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def peak_gpu_memory_gib(log: str) -> float | None:
    """The largest peak the server logged at shutdown, over its devices."""
    peaks = [float(match[1]) for match in PEAK_MEMORY.findall(log)]
    return max(peaks) if peaks else None
