"""`appliance init`: everything the service needs on disk, made once and kept."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator

from .config import Config
from .db import migrate, migrations, open_database


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
    if not config.secret_file.exists():
        # Signs console sessions; created with owner-only permissions from the start.
        fd = os.open(config.secret_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_hex(32))
        yield f"created {config.secret_file}"
