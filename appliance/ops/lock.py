"""The service lock: one running service per data folder, and no restore under it.

`appliance serve` holds an exclusive flock on DATA/serve.lock for as long as it
runs; the kernel drops it when the process ends however it ends, so a crash
never leaves a stale lock behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from appliance.core.errors import Conflict
from appliance.core.files import PRIVATE_FILE, private_folder

LOCK_NAME = "serve.lock"


def lock_path(data_dir: Path) -> Path:
    return data_dir / LOCK_NAME


def holder(data_dir: Path) -> str | None:
    """The pid written by the process holding the lock, or None when nobody holds it."""
    path = lock_path(data_dir)
    if not path.exists():
        return None
    with path.open("r") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return fh.read().strip() or "unknown"
        fcntl.flock(fh, fcntl.LOCK_UN)
    return None


@contextlib.contextmanager
def service_lock(data_dir: Path, purpose: str) -> Iterator[None]:
    private_folder(data_dir)
    fd = os.open(lock_path(data_dir), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, PRIVATE_FILE)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise Conflict(
                f"cannot {purpose}: the service is running on {data_dir} (pid {pid}, holding"
                f" {lock_path(data_dir)}); stop it first, e.g. systemctl stop ai-media-maker"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)
