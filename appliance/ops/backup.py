"""`appliance backup` and `appliance restore`.

A backup is a folder: the database copied through SQLite's online backup API
(a consistent snapshot even while the service writes, WAL included), checked
with `PRAGMA integrity_check`, plus the image files, the service's secret and
a copy of the config for reference. It is built under a hidden name and
renamed into place at the end, so a folder with the final name is complete.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from appliance.core.clock import utc_now
from appliance.core.config import Config
from appliance.core.database import BUSY_TIMEOUT_SECONDS
from appliance.core.errors import ApplianceError, BadRequest
from appliance.core.files import (
    PRIVATE_FILE,
    PRIVATE_FOLDER,
    is_free,
    private_file,
    private_folder,
    staged_folder,
    write_private,
)
from appliance.core.version import package_version
from appliance.ops.lock import service_lock

MANIFEST = "manifest.json"
DATABASE = "appliance.db"
IMAGES = "images"
SECRET = "secret_key"
CONFIG = "config.toml"
FORMAT = 1


class BackupError(ApplianceError):
    pass


@dataclass(frozen=True)
class BackupSummary:
    path: Path
    rows: dict[str, int]
    images: int


@dataclass(frozen=True)
class RestoreSummary:
    rows: dict[str, int]
    images: int
    previous: Path | None  # where the data it replaced was moved


def integrity_problem(path: Path) -> str | None:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        results = [row[0] for row in conn.execute("PRAGMA integrity_check")]
    except sqlite3.DatabaseError as exc:
        return str(exc)
    finally:
        conn.close()
    return None if results == ["ok"] else "; ".join(results[:5])


def row_counts(path: Path) -> dict[str, int]:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        tables = [row[0] for row in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
            " ORDER BY name")]
        return {name: conn.execute(f'SELECT COUNT(*) FROM "{name}"').fetchone()[0]
                for name in tables}
    finally:
        conn.close()


def copy_database(source: Path, target: Path) -> None:
    """A consistent snapshot of a live database, as one self-contained file."""
    src = sqlite3.connect(str(source), timeout=BUSY_TIMEOUT_SECONDS)
    # Owner-only before SQLite writes to it (its journal then gets the same mode).
    private_file(target)
    dst = sqlite3.connect(str(target))
    try:
        # pages=-1 copies everything in one step, inside one read transaction:
        # the copy is the database as of one commit, whatever writers do meanwhile.
        src.backup(dst, pages=-1)
        # The copy needs no -wal file beside it.
        dst.execute("PRAGMA journal_mode=DELETE")
    finally:
        dst.close()
        src.close()


def _image_files(images_dir: Path) -> list[Path]:
    if not images_dir.is_dir():
        return []
    # Dot files are PNGs still being written (see engine/storage.py).
    return sorted(path for path in images_dir.rglob("*")
                  if path.is_file() and not path.name.startswith("."))


def _copy_images(source: Path, target: Path) -> int:
    files = _image_files(source)
    for path in files:
        destination = target / path.relative_to(source)
        private_folder(destination.parent)
        # copy2 copies the source's mode too, and an image written before images were
        # made owner-only may be readable by all.
        shutil.copy2(path, destination)
        os.chmod(destination, PRIVATE_FILE)
    return len(files)


def _copy_private(source: Path, target: Path) -> None:
    write_private(target, source.read_bytes())


def _fsync_tree(folder: Path) -> None:
    for path in [*folder.rglob("*"), folder]:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def sqlite_file(config: Config, command: str) -> Path:
    """The database file that `backup` and `restore` copy; in cluster mode, how to do it."""
    database = config.storage.database
    if isinstance(database, Path):
        return database
    raise BadRequest(
        f"appliance {command} copies a SQLite file; this appliance keeps its data in PostgreSQL"
        f" ({database}). Back the database up with pg_dump --format=custom --file=FILE"
        f" {database.name!r} (pg_restore puts it back), and the images folder"
        f" ({config.images_dir}) with your storage's own tools")


def create_backup(config: Config, target: Path) -> BackupSummary:
    target = Path(os.path.abspath(target))
    database = sqlite_file(config, "backup")
    if not database.exists():
        raise BadRequest(f"there is no database at {database}: nothing to back up")
    if not is_free(target):
        raise BadRequest(f"{target} already exists and is not an empty folder; name a new one")
    # Owner-only: the backup holds the service's secret and every account's data.
    with staged_folder(target, mode=PRIVATE_FOLDER) as staging:
        copy_database(database, staging / DATABASE)
        problem = integrity_problem(staging / DATABASE)
        if problem:
            raise BackupError(f"the copy of the database failed its integrity check: {problem}")
        rows = row_counts(staging / DATABASE)
        images = _copy_images(config.images_dir, staging / IMAGES)
        if config.secret_file.exists():
            _copy_private(config.secret_file, staging / SECRET)
        if config.source is not None and config.source.exists():
            _copy_private(config.source, staging / CONFIG)
        manifest = {
            "format": FORMAT,
            "created_at": utc_now(),
            "version": package_version(),
            "database": DATABASE,
            "integrity_check": "ok",
            "rows": rows,
            "images": images,
            "secret_key": (staging / SECRET).exists(),
        }
        write_private(staging / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())
        _fsync_tree(staging)
    return BackupSummary(target, rows, images)


def read_manifest(source: Path) -> dict:
    manifest = source / MANIFEST
    if not manifest.is_file():
        raise BadRequest(f"{source} is not a backup made by `appliance backup`: it has no"
                         f" {MANIFEST}")
    try:
        data = json.loads(manifest.read_text())
    except ValueError as exc:
        raise BadRequest(f"{manifest} is damaged: {exc}") from None
    if data.get("format") != FORMAT or not (source / DATABASE).is_file():
        raise BadRequest(f"{source} is not a backup this version can restore")
    return data


def _move_aside(path: Path, aside: Path) -> None:
    if path.exists():
        aside.mkdir(mode=PRIVATE_FOLDER, exist_ok=True)
        shutil.move(str(path), str(aside / path.name))


def _install_database(source: Path, target: Path) -> None:
    private_folder(target.parent)
    partial = target.with_name(f".{target.name}.restoring")
    # Owner-only before a byte of it is written; copyfile keeps an existing file's mode.
    write_private(partial, b"")
    shutil.copyfile(source, partial)
    with partial.open("rb+") as fh:
        os.fsync(fh.fileno())
    partial.replace(target)


def restore_backup(config: Config, source: Path) -> RestoreSummary:
    """Replaces the database, images and secret with a backup's, for a stopped service.

    What it replaces is moved, not deleted, into DATA/pre-restore-<time>.
    """
    source = Path(os.path.abspath(source))
    database = sqlite_file(config, "restore")
    read_manifest(source)
    problem = integrity_problem(source / DATABASE)
    if problem:
        raise BackupError(f"the backup's database is damaged ({problem}); nothing was changed")
    data_dir = config.storage.data_dir
    with service_lock(data_dir, "restore"):
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        aside = data_dir / f"pre-restore-{stamp}"
        # The -wal file may hold the last commits of a crashed run: it moves with its database.
        for path in (database, Path(f"{database}-wal"), Path(f"{database}-shm"), config.images_dir):
            _move_aside(path, aside)
        if (source / SECRET).exists():
            _move_aside(config.secret_file, aside)
        _install_database(source / DATABASE, database)
        images = _copy_images(source / IMAGES, config.images_dir)
        private_folder(config.images_dir)
        if (source / SECRET).exists():
            _copy_private(source / SECRET, config.secret_file)
        problem = integrity_problem(database)
        if problem:
            raise BackupError(f"the restored database failed its integrity check: {problem};"
                              f" the previous data is in {aside}")
    return RestoreSummary(row_counts(database), images, aside if aside.exists() else None)
