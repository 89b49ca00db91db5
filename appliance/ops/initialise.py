"""`appliance init`: everything the service needs on disk, made once and kept."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from pathlib import Path

from appliance.core.config import Config
from appliance.core.database import migrate, open_database
from appliance.core.files import PRIVATE_FILE, private_folder
from appliance.core.schema import migrations


def initialise(config: Config) -> Iterator[str]:
    """Yields a line for each thing made; making nothing on a second run.

    Everything it makes is owner-only (folders 0700, files 0600), whatever the umask.
    """
    if not config.storage.data_dir.exists():
        private_folder(config.storage.data_dir)
        yield f"created {config.storage.data_dir}"
    # The database before the rest: one that cannot be used stops it with nothing else made.
    existed = config.storage.database.exists()
    db = open_database(config.storage.database)
    try:
        pending = [m.name for m in migrations.pending(db)]
        migrate(db)
    finally:
        db.close()
    if not existed:
        yield f"created database {config.storage.database}"
    elif pending:
        yield f"upgraded database {config.storage.database}: {', '.join(pending)}"
    if not config.images_dir.exists():
        private_folder(config.images_dir)
        yield f"created {config.images_dir}"
    if make_secret_file(config.secret_file):
        yield f"created {config.secret_file}"


def make_secret_file(path: Path) -> bool:
    """Creates the secret unless it exists; True when it was made now."""
    if path.exists():
        return False
    private_folder(path.parent)
    # Signs the console's CSRF tokens; created with owner-only permissions from the start.
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE)
    except FileExistsError:  # another process made it just now
        return False
    with os.fdopen(fd, "w") as fh:
        fh.write(secrets.token_hex(32))
    return True
