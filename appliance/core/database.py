"""The SQLite database: a connection per thread, and write transactions."""

from __future__ import annotations

import contextlib
import itertools
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from sqlite_utils import Database

from appliance.core.schema import migrations

BUSY_TIMEOUT_SECONDS = 10.0

def open_database(path: Path, busy_timeout_seconds: float = BUSY_TIMEOUT_SECONDS) -> Database:
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(str(path), timeout=busy_timeout_seconds)
    db = Database(conn)
    with db.ensure_autocommit_on():
        db.execute("PRAGMA journal_mode=WAL")
    db.execute(f"PRAGMA busy_timeout={int(busy_timeout_seconds * 1000)}")
    db.execute("PRAGMA foreign_keys=ON")
    # WAL with synchronous=NORMAL stays consistent after a crash; a power cut
    # may only lose the last commits, which the job recovery tolerates.
    db.execute("PRAGMA synchronous=NORMAL")
    return db


def migrate(db: Database) -> None:
    migrations.apply(db)


def insert(db: Database, sql: str, params: Sequence[Any]) -> int:
    """Runs an INSERT and returns the new row's id."""
    row_id = db.execute(sql, params).lastrowid
    if row_id is None:  # an INSERT into a rowid table always makes one
        raise sqlite3.InterfaceError(f"no row was inserted by {sql!r}")
    return row_id


@contextlib.contextmanager
def immediate(db: Database) -> Iterator[Database]:
    """A write transaction that takes the write lock up front.

    Read-then-write sequences (check credits, then charge) must not start as
    readers: two of them could both read the old balance. Inside another
    `immediate` block it joins that transaction through a savepoint, so a
    caller can make several services' writes one all-or-nothing unit.
    """
    if db.conn.in_transaction:
        with _savepoint(db):
            yield db
        return
    db.execute("BEGIN IMMEDIATE")
    try:
        yield db
        # A COMMIT can fail too (a full disk); what it leaves open is rolled back below.
        db.commit()
    except BaseException:
        # The original error matters, not a failed rollback (SQLite may have
        # rolled back by itself already).
        with contextlib.suppress(sqlite3.Error):
            db.rollback()
        raise


@contextlib.contextmanager
def _savepoint(db: Database) -> Iterator[None]:
    name = f"nested_{next(_savepoint_numbers)}"
    db.conn.execute(f"SAVEPOINT {name}")
    try:
        yield
    except BaseException:
        if db.conn.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                db.conn.execute(f"ROLLBACK TO {name}")
                db.conn.execute(f"RELEASE {name}")
        raise
    db.conn.execute(f"RELEASE {name}")


_savepoint_numbers = itertools.count()


class ConnectionPool:
    """Hands each thread its own connection to one database file.

    sqlite3 connections must stay on the thread that made them; the request
    thread pool, the event loop and the engine worker each get their own.
    """

    def __init__(self, path: Path, busy_timeout_seconds: float = BUSY_TIMEOUT_SECONDS):
        self.path = path
        self.busy_timeout_seconds = busy_timeout_seconds
        self._local = threading.local()
        self._all: list[Database] = []
        self._lock = threading.Lock()
        migrate(self.db())

    def __deepcopy__(self, memo: dict) -> ConnectionPool:
        # One pool per database file: the copies Litestar makes of the routes
        # and middleware that hold it must share it, not clone its connections.
        return self

    def db(self) -> Database:
        db = getattr(self._local, "db", None)
        if db is None:
            db = open_database(self.path, self.busy_timeout_seconds)
            self._local.db = db
            with self._lock:
                self._all.append(db)
        return db

    def close(self) -> None:
        with self._lock:
            for db in self._all:
                with contextlib.suppress(sqlite3.ProgrammingError):
                    db.close()
            self._all.clear()
        self._local = threading.local()
