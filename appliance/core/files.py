"""Folders that appear whole or not at all."""

from __future__ import annotations

import contextlib
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
