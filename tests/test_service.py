"""A real `appliance serve` under a stand-in for systemd's notification socket, and doctor."""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from .serve_process import cli, free_port

pytestmark = pytest.mark.system


class NotifySocket:
    """What systemd listens on: a datagram socket; each message is timestamped on arrival."""

    def __init__(self, path: Path):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.1)
        self.messages: list[tuple[float, str]] = []

    def collect(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            with contextlib.suppress(TimeoutError):
                self.messages.append((time.monotonic(), self.sock.recv(4096).decode()))

    def wait_for(self, text: str, timeout: float, process: subprocess.Popen) -> float:
        deadline = time.monotonic() + timeout
        while True:
            for moment, message in self.messages:
                if text in message.splitlines():
                    return moment
            assert process.poll() is None, f"serve exited with {process.returncode}"
            assert time.monotonic() < deadline, f"no {text} in {self.messages}"
            self.collect(0.1)

    def times(self, text: str) -> list[float]:
        return [moment for moment, message in self.messages if text in message.splitlines()]

    def close(self) -> None:
        self.sock.close()


def start_serve(tmp_path: Path, config_text: str, watchdog_usec: int = 0):
    config = tmp_path / "config.toml"
    config.write_text(config_text)
    notify = NotifySocket(tmp_path / "notify.sock")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "NOTIFY_SOCKET": str(notify.path)}
    if watchdog_usec:
        env["WATCHDOG_USEC"] = str(watchdog_usec)
    log_path = tmp_path / "serve.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen([sys.executable, "-m", "appliance", "serve", "--config",
                                    str(config)], stdout=log, stderr=subprocess.STDOUT, env=env)
    return config, notify, process, log_path


@pytest.fixture
def stop_afterwards():
    processes: list[subprocess.Popen] = []
    yield processes.append
    for process in processes:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_ready_only_when_loaded_and_watchdog_only_while_the_worker_comes_back(
        tmp_path, tiny_model, stop_afterwards):
    port = free_port()
    config, notify, process, log_path = start_serve(tmp_path, (
        f'[server]\nport = {port}\n'
        f'[model]\npath = "{tiny_model}"\ndevice = "cpu"\n'
        '[generation]\nwidth = 64\nheight = 64\nsteps = 2\n'
        # A lone image waits a second and a half for its batch to fill: time to take the lock.
        '[engine]\nbatch_size = 2\nbatch_window_seconds = 1.5\n'
        # A worker away from its queue for more than two seconds counts as hung.
        '[health]\nworker_stall_seconds = 2\n'
    ), watchdog_usec=400_000)
    stop_afterwards(process)
    base = f"http://127.0.0.1:{port}"

    ready_at = notify.wait_for("READY=1", 120, process)
    # READY=1 comes no earlier than the HTTP server and the model.
    assert httpx.get(f"{base}/readyz", timeout=5).json()["status"] == "ready"
    notify.collect(2.0)
    idle_pings = [t for t in notify.times("WATCHDOG=1") if t > ready_at]
    # Every half period (0.2 s) when the machine is not too busy to say so.
    assert len(idle_pings) >= 4, notify.messages
    assert max(b - a for a, b in itertools.pairwise(idle_pings)) < 2.0

    # One service per data folder: a second one is refused before it loads anything.
    second = subprocess.run([sys.executable, "-m", "appliance", "serve", "--config", str(config),
                             "--port", str(free_port())], capture_output=True, text=True,
                            timeout=120)
    assert second.returncode == 1
    assert "cannot start the service: the service is running" in second.stderr
    doctor = subprocess.run([sys.executable, "-m", "appliance", "doctor", "--config", str(config)],
                            capture_output=True, text=True, timeout=120)
    assert doctor.returncode == 0, doctor.stdout
    assert f"running (pid {process.pid}) and ready" in doctor.stdout
    assert "tiny demo model" in doctor.stdout

    # The worker gets stuck in a call that does not return, as in a hung CUDA
    # call: here it waits for the database's write lock, which the test takes
    # while the job sits in its batch window, and holds for five seconds.
    cli(config, "accounts", "create", "dev@example.com", "--credits", "1", "--password-stdin",
        stdin="correct horse battery\n")
    key = cli(config, "keys", "create", "dev@example.com", "--name", "Test").splitlines()[-1]
    headers = {"Authorization": f"Bearer {key}"}
    database = sqlite3.connect(tmp_path / "data" / "appliance.db", timeout=30,
                               isolation_level=None)
    job = httpx.post(f"{base}/api/playground/images", headers=headers, timeout=30,
                     json={"prompts": ["stuck"]}).json()
    database.execute("BEGIN IMMEDIATE")
    held_from = time.monotonic()
    not_ready = None
    while time.monotonic() - held_from < 5:
        notify.collect(0.2)
        ready = httpx.get(f"{base}/readyz", timeout=5)
        if ready.status_code == 503:
            not_ready = ready.json()["error"]
    assert httpx.get(f"{base}/api/playground/images/{job['jobId']}", headers=headers,
                     timeout=5).json()["status"] == "queued"
    database.execute("ROLLBACK")
    released = time.monotonic()
    database.close()
    status = "queued"
    while status not in ("completed", "failed"):
        notify.collect(0.2)
        status = httpx.get(f"{base}/api/playground/images/{job['jobId']}", headers=headers,
                           timeout=5).json()["status"]
        assert time.monotonic() - released < 120, "the job did not finish"
    notify.collect(1.0)
    assert status == "completed"
    pings = notify.times("WATCHDOG=1")
    # Stalled for more than two seconds, no ping until the lock was released...
    assert not [t for t in pings if held_from + 2.6 < t < released], notify.messages
    assert not_ready and "a batch is hung" in not_ready
    assert any("STATUS=an engine worker has not come back" in m for _, m in notify.messages)
    # ...and the pings resume once the worker comes back.
    assert len([t for t in pings if t > released]) >= 2, notify.messages

    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) in (0, -signal.SIGTERM)
    notify.collect(0.3)
    assert notify.times("STOPPING=1")
    notify.close()
    log = log_path.read_text()
    assert "withholding the watchdog" in log and key not in log


def test_a_model_that_cannot_load_stops_the_service_under_systemd(tmp_path, stop_afterwards):
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "notes.txt").write_text("not a model")
    port = free_port()
    _, notify, process, log_path = start_serve(tmp_path, (
        f'[server]\nport = {port}\n[model]\npath = "{broken}"\ndevice = "cpu"\n'))
    stop_afterwards(process)
    assert process.wait(timeout=120) == 1, log_path.read_text()
    notify.collect(0.3)
    statuses = [m for _, m in notify.messages if m.startswith("STATUS=the model could not")]
    assert statuses and "model_index.json" in statuses[0]
    assert not notify.times("READY=1")
    notify.close()


def test_doctor_says_what_is_wrong_and_fails(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "garbage.db").write_bytes(b"this is not a database" * 100)
    config = tmp_path / "config.toml"
    empty, garbage = tmp_path / "empty", tmp_path / "garbage.db"
    config.write_text(f'[model]\npath = "{empty}"\ndevice = "cuda"\n'
                      f'[storage]\ndatabase = "{garbage}"\n')
    result = subprocess.run([sys.executable, "-m", "appliance", "doctor", "--config", str(config)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    problems = [line for line in result.stdout.splitlines() if line.startswith("problem")]
    for expected in ("model.device is cuda, which needs one", "has no model_index.json",
                     "garbage.db is not a SQLite database"):
        assert any(expected in line for line in problems), result.stdout
    assert result.stdout.rstrip().endswith("3 problem(s) found")
