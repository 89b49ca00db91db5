"""Folders that appear whole or not at all, and files only their owner may open."""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path


def is_free(target: Path) -> bool:
    """Nothing there yet, or an empty folder that may be replaced."""
    return not target.exists() or (target.is_dir() and not any(target.iterdir()))


@contextlib.contextmanager
def staged_folder(target: Path, mode: int = 0o777) -> Iterator[Path]:
    """Yields a hidden folder beside `target` to fill; renames it to `target` once the block ends.

    An interrupted or failed block removes what it wrote, so a folder with the
    target's name is always complete. `target` must be free (is_free) at the
    end. `mode` applies to the folder as made (before the umask): a private
    0700 then holds from the first file on.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}.{uuid.uuid4().hex}.partial"
    staging.mkdir(mode=mode)
    try:
        yield staging
        if not is_free(target):
            raise FileExistsError(f"{target} appeared while it was being made")
        if target.exists():
            target.rmdir()
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


# The data holds password hashes, emails, prompts and images: owner-only, whatever the
# umask of whoever starts the process (systemd's UMask=0077 covers only the service).
PRIVATE_FILE = 0o600
PRIVATE_FOLDER = 0o700


def private_folder(path: Path) -> None:
    """Makes the folder and any missing parents owner-only; an existing folder is left as it is."""
    if path.is_dir():
        return
    private_folder(path.parent)
    with contextlib.suppress(FileExistsError):  # made meanwhile by another thread
        path.mkdir(mode=PRIVATE_FOLDER)
        # The umask may have taken bits away (0o277 leaves 0o500): exactly 0700.
        os.chmod(path, PRIVATE_FOLDER)


def private_file(path: Path) -> bool:
    """Creates the file empty and owner-only unless it exists; True when it was made now."""
    private_folder(path.parent)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE)
    except FileExistsError:
        return False
    try:
        os.fchmod(fd, PRIVATE_FILE)
    finally:
        os.close(fd)
    return True


def write_private(path: Path, data: bytes) -> None:
    """Writes the file (replacing its content) with owner-only permissions from the start."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, PRIVATE_FILE)
    with os.fdopen(fd, "wb") as fh:
        os.fchmod(fh.fileno(), PRIVATE_FILE)
        fh.write(data)
