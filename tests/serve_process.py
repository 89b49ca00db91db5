"""Real `appliance serve` processes on loopback ports, to kill, restart and hammer.

Where the point is the process itself (SIGKILL, many concurrent clients on
real sockets), a thread in the test process will not do.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from appliance.bench.serving import answers_ok, free_port

STARTUP_TIMEOUT = 120.0


def write_config(folder: Path, model_path: Path, /, **sections: dict) -> Path:
    """A config.toml in `folder` serving the tiny model on a free port; `sections` add to it
    (a [model] section too)."""
    settings: dict[str, dict] = {
        "server": {"port": free_port()},
        "model": {"path": str(model_path), "device": "cpu"},
        "generation": {"width": 64, "height": 64, "steps": 2},
    }
    for name, values in sections.items():
        settings.setdefault(name, {}).update(values)
    lines = []
    for name, values in settings.items():
        lines.append(f"[{name}]")
        lines += [f"{key} = {_toml(value)}" for key, value in values.items()]
    path = folder / "config.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def _toml(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def cli(config: Path, *args: str, stdin: str = "") -> str:
    result = subprocess.run([sys.executable, "-m", "appliance", *args, "--config", str(config)],
                            input=stdin, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


# Importing torch and diffusers costs a new interpreter most of its start-up
# (over ten seconds of CPU). A launcher imports them once and forks each
# `appliance serve` from there: every server is still its own process, running
# the command's own code, and dies by SIGKILL like any other.
_LAUNCHER = r"""
import os, resource, signal, sys, traceback
import appliance.web.app, appliance.cli.main, appliance.engine.diffusers_generator
signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the kernel reaps the servers
for line in sys.stdin:
    config, log, open_files = line.rstrip("\n").split("\t")
    pid = os.fork()
    if pid == 0:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        if open_files:
            soft, hard = map(int, open_files.split(":"))
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        out = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.dup2(out, 1)
        os.dup2(out, 2)
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
        code = 1
        try:
            code = appliance.cli.main.main(["serve", "--config", config])
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code or 0)
    print(pid, flush=True)
"""


class Launcher:
    def __init__(self) -> None:
        self.process = subprocess.Popen([sys.executable, "-c", _LAUNCHER], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True,
                                        env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def serve(self, config: Path, log_path: Path,
              open_files: tuple[int, int] | None = None) -> int:
        """Starts `appliance serve --config CONFIG` with its output appended to LOG; its pid.
        `open_files`: the (soft, hard) limit of open files it starts with."""
        limit = f"{open_files[0]}:{open_files[1]}" if open_files else ""
        self.process.stdin.write(f"{config}\t{log_path}\t{limit}\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        assert line, "the launcher died"
        return int(line)

    def close(self) -> None:
        self.process.stdin.close()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


class ServeProcess:
    """`appliance serve --config CONFIG` from a Launcher, its output appended to `log_path`."""

    def __init__(self, config: Path, log_path: Path, launcher: Launcher,
                 open_files: tuple[int, int] | None = None):
        self.config = config
        self.log_path = log_path
        self.launcher = launcher
        self.open_files = open_files
        port = next(line for line in config.read_text().splitlines() if line.startswith("port"))
        self.url = f"http://127.0.0.1:{port.split('=')[1].strip()}"
        self.pid: int | None = None

    def start(self) -> ServeProcess:
        self.pid = self.launcher.serve(self.config, self.log_path, self.open_files)
        self.wait_ready()
        return self

    @property
    def running(self) -> bool:
        return self.pid is not None and alive(self.pid)

    def wait_ready(self) -> None:
        """Until /readyz says the model is loaded and the worker runs."""
        if not answers_ok(f"{self.url}/readyz", lambda: self.running, STARTUP_TIMEOUT, 0.1):
            self.kill()
            raise AssertionError(f"the server did not start:\n{self.log_path.read_text()}")

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs, as in a power cut of the process."""
        self._signal(signal.SIGKILL, 30)

    def stop(self) -> None:
        if not self._signal(signal.SIGTERM, 60):
            self.kill()

    def _signal(self, signum: int, timeout: float) -> bool:
        """Sends the signal and waits for the process to go; False if it did not in time."""
        if not self.running:
            return True
        os.kill(self.pid, signum)
        deadline = time.monotonic() + timeout
        while self.running:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)
        return True
