"""`appliance init`: everything the service needs on disk, made once and kept."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from pathlib import Path

from appliance.core.config import Config
from appliance.core.database import FIRST_MIGRATION, Database, connect, migrate
from appliance.core.database_url import DatabaseUrl
from appliance.core.files import PRIVATE_FILE, private_folder


def initialise(config: Config) -> Iterator[str]:
    """Yields a line for each thing made; making nothing on a second run.

    Everything it makes is owner-only (folders 0700, files 0600), whatever the umask.
    """
    if not config.storage.data_dir.exists():
        private_folder(config.storage.data_dir)
        yield f"created {config.storage.data_dir}"
    # The database before the rest: one that cannot be used stops it with nothing else made.
    # Safe when several nodes of a cluster start together: each migration is applied once.
    database = config.storage.database
    existed = not isinstance(database, Path) or database.exists()
    db = connect(database)
    try:
        applied = migrate(db)
        if isinstance(database, DatabaseUrl) and take_cluster_secret(db, config.secret_file):
            yield f"took the cluster's console secret into {config.secret_file}"
    finally:
        db.close()
    if not existed or (applied and applied[0] == FIRST_MIGRATION):
        yield f"created database {database}"
    elif applied:
        yield f"upgraded database {database}: {', '.join(applied)}"
    if not config.images_dir.exists():
        private_folder(config.images_dir)
        yield f"created {config.images_dir}"
    if make_secret_file(config.secret_file):
        yield f"created {config.secret_file}"


def take_cluster_secret(db: Database, path: Path) -> bool:
    """Cluster mode: every node signs the console's forms with one secret, kept in the
    database: the first node's (its file's, or a new one), which the others take into
    their files. True when the file was written now."""
    mine = path.read_text().strip() if path.exists() else secrets.token_hex(32)
    db.execute("INSERT INTO cluster_secrets (name, value) VALUES ('console', ?)"
               " ON CONFLICT (name) DO NOTHING", [mine])
    shared = db.execute("SELECT value FROM cluster_secrets WHERE name = 'console'").fetchone()[0]
    if path.exists() and shared == mine:
        return False
    private_folder(path.parent)
    staged = path.with_name(path.name + ".new")
    staged.unlink(missing_ok=True)
    fd = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE)
    with os.fdopen(fd, "w") as fh:
        fh.write(shared)
    os.replace(staged, path)
    return True


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
