"""A minimal Debian booted with systemd as PID 1 in a container, for the install's boot test.

The root file system comes from debootstrap and is cached between runs on the
same machine; each run boots a fresh copy of it. The appliance is installed
inside from a folder of wheels made here (`pip wheel`), with no package index,
as on a server without internet access. The container has a network of its
own, so the service's port 8000 is its own too.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("APPLIANCE_BOOT_CACHE", "/var/cache/ai-media-maker-boot"))
SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
# What a minimal server has, plus curl to call the API from inside.
PACKAGES = ["systemd", "systemd-sysv", "dbus", "python3", "python3-venv", "ca-certificates",
            "procps", "curl"]
# The checkout's copy inside the machine, and the wheels it installs from.
CHECKOUT = "/root/ai-media-maker"
WHEELS = "/root/wheels"
BOOT_TIMEOUT = 120.0


class MachineError(AssertionError):
    pass


def cannot_boot() -> str | None:
    """Why no machine can be booted here, or None when one can."""
    if os.geteuid() != 0:
        return "the boot test needs root (debootstrap and systemd-nspawn)"
    missing = [tool for tool in ("systemd-nspawn", "debootstrap", "nsenter")
               if shutil.which(tool) is None]
    if missing:
        return f"the boot test needs {', '.join(missing)} (install.sh --test installs them)"
    return None


def _run(command: list[str], timeout: float, **options) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, **options)


def root_filesystem() -> Path:
    """The cached debootstrap tree, made on first use (about a minute)."""
    key = hashlib.sha256(" ".join([SUITE, *PACKAGES]).encode()).hexdigest()[:12]
    tree = CACHE / f"{SUITE}-{key}"
    if (tree / "etc" / "os-release").exists():
        return tree
    CACHE.mkdir(parents=True, exist_ok=True)
    partial = CACHE / f".{tree.name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    made = _run(["debootstrap", "--variant=minbase", f"--include={','.join(PACKAGES)}", SUITE,
                 str(partial), MIRROR], timeout=1800)
    if made.returncode != 0:
        raise MachineError(f"debootstrap failed:\n{made.stdout[-2000:]}{made.stderr[-2000:]}")
    partial.rename(tree)
    return tree


def wheels() -> Path:
    """The project's dependencies as wheels (the CPU build of torch), cached by pyproject.toml.

    The project itself is built from the checkout by install.sh, as on a server.
    """
    key = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()[:12]
    folder = CACHE / f"wheels-{key}"
    if (folder / ".complete").exists():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    # setuptools for building the project in isolation inside; torch pinned to the
    # CPU build install.sh asks for where there is no GPU.
    made = _run([sys.executable, "-m", "pip", "wheel", "--quiet", "--wheel-dir", str(folder),
                 str(ROOT), "torch==2.13.0", "setuptools>=69", "wheel"], timeout=1800)
    if made.returncode != 0:
        raise MachineError(f"pip wheel failed:\n{made.stderr[-3000:]}")
    for built in folder.glob("ai_media_maker-*.whl"):
        built.unlink()
    (folder / ".complete").touch()
    return folder


def _copy_checkout(target: Path) -> None:
    listed = _run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                  timeout=60, cwd=ROOT)
    if listed.returncode != 0:
        raise MachineError(f"git ls-files failed: {listed.stderr}")
    for name in filter(None, listed.stdout.split("\0")):
        source = ROOT / name
        if source.is_file():
            destination = target / name
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination)


class Machine:
    """A booted container; `run` executes a shell command inside as root."""

    def __init__(self, tree: Path, log: Path):
        self.tree = tree
        self.log = log
        self.process: subprocess.Popen[bytes] | None = None
        self.pid: int | None = None

    def boot(self) -> None:
        with self.log.open("wb") as output:
            self.process = subprocess.Popen(
                ["systemd-nspawn", "--quiet", f"--directory={self.tree}", "--boot",
                 "--register=no", "--keep-unit", "--private-network", "--console=pipe",
                 "--machine=appliance-boot-test"],
                stdout=output, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + BOOT_TIMEOUT
        while True:
            self.pid = self._init_pid()
            if self.pid is not None:
                state = self.run("systemctl is-system-running", check=False).stdout.strip()
                if state in ("running", "degraded"):
                    return
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise MachineError(f"the machine did not boot:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.5)

    def _init_pid(self) -> int | None:
        # The container's PID 1 is systemd-nspawn's only child.
        assert self.process is not None
        children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
        try:
            pids = children.read_text().split()
        except OSError:
            return None
        return int(pids[0]) if pids else None

    def run(self, script: str, check: bool = True, timeout: float = 600,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        """`script` in bash inside the machine, with a login-like environment of its own."""
        assert self.pid is not None
        environment = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                       "HOME": "/root", "LANG": "C.UTF-8", **(env or {})}
        command = ["nsenter", f"--target={self.pid}", "--all", "env", "-i",
                   *(f"{name}={value}" for name, value in environment.items()),
                   "bash", "-c", f"cd /root && {script}"]
        done = _run(command, timeout=timeout)
        if check and done.returncode != 0:
            raise MachineError(f"inside the machine, `{script}` exited {done.returncode}:\n"
                               f"{done.stdout[-4000:]}\n{done.stderr[-4000:]}")
        return done

    def shut_down(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()  # nspawn asks the machine's systemd to power off
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@contextmanager
def booted_machine(work: Path) -> Iterator[Machine]:
    """A fresh copy of the cached tree with the checkout and the wheels in it, booted."""
    tree = work / "root"
    copied = _run(["cp", "-a", "--reflink=auto", str(root_filesystem()), str(tree)], timeout=600)
    if copied.returncode != 0:
        raise MachineError(f"copying the root file system failed: {copied.stderr}")
    _copy_checkout(tree / CHECKOUT.lstrip("/"))
    shutil.copytree(wheels(), tree / WHEELS.lstrip("/"))
    machine = Machine(tree, work / "machine.log")
    try:
        machine.boot()
        yield machine
    finally:
        machine.shut_down()
        shutil.rmtree(tree, ignore_errors=True)
