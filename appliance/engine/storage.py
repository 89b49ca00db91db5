"""Writing images so that a reader never sees a half-written file."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from PIL import Image

from appliance.core.files import private_folder


def write_png_atomic(image: Image.Image, path: Path, compress_level: int = 6) -> None:
    private_folder(path.parent)
    # mkstemp makes the file owner-only (0600), whatever the umask.
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            image.save(fh, format="PNG", compress_level=compress_level)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
