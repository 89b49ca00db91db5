"""`appliance init`: everything the service needs on disk, made once and kept."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from pathlib import Path

from appliance.core.config import Config
from appliance.core.database import migrate, open_database
from appliance.core.schema import migrations


def initialise(config: Config) -> Iterator[str]:
    """Yields a line for each thing made; making nothing on a second run."""
    for folder in (config.storage.data_dir, config.images_dir):
        if not folder.exists():
            folder.mkdir(parents=True)
            yield f"created {folder}"
    existed = config.storage.database.exists()
    db = open_database(config.storage.database)
    pending = [m.name for m in migrations.pending(db)]
    migrate(db)
    db.close()
    if not existed:
        yield f"created database {config.storage.database}"
    elif pending:
        yield f"upgraded database {config.storage.database}: {', '.join(pending)}"
    if make_secret_file(config.secret_file):
        yield f"created {config.secret_file}"


def make_secret_file(path: Path) -> bool:
    """Creates the secret unless it exists; True when it was made now."""
    if path.exists():
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    # Signs the console's CSRF tokens; created with owner-only permissions from the start.
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process made it just now
        return False
    with os.fdopen(fd, "w") as fh:
        fh.write(secrets.token_hex(32))
    return True
