"""The SQLite database: a connection per thread, write transactions, and its troubles in words."""

from __future__ import annotations

import contextlib
import getpass
import itertools
import sqlite3
import threading
import time
import weakref
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from sqlite_utils import Database

from appliance.core.files import private_file
from appliance.core.schema import migrations

BUSY_TIMEOUT_SECONDS = 10.0


def open_database(path: Path, busy_timeout_seconds: float = BUSY_TIMEOUT_SECONDS) -> Database:
    # Made owner-only before SQLite opens it: SQLite gives the -wal and -shm files
    # the database's own permissions, so all three stay private whatever the umask.
    private_file(path)
    conn = sqlite3.connect(str(path), timeout=busy_timeout_seconds)
    db = Database(conn)
    try:
        # The first statements read the file: a damaged one fails here.
        with db.ensure_autocommit_on():
            db.execute("PRAGMA journal_mode=WAL")
        db.execute(f"PRAGMA busy_timeout={int(busy_timeout_seconds * 1000)}")
        db.execute("PRAGMA foreign_keys=ON")
        # WAL with synchronous=NORMAL stays consistent after a crash; a power cut
        # may only lose the last commits, which the job recovery tolerates.
        db.execute("PRAGMA synchronous=NORMAL")
    except BaseException:
        conn.close()
        raise
    return db


def migrate(db: Database) -> None:
    migrations.apply(db)


def insert(db: Database, sql: str, params: Sequence[Any]) -> int:
    """Runs an INSERT and returns the new row's id."""
    row_id = db.execute(sql, params).lastrowid
    if row_id is None:  # an INSERT into a rowid table always makes one
        raise sqlite3.InterfaceError(f"no row was inserted by {sql!r}")
    return row_id


def unless_busy(db: Database, sql: str, params: list) -> bool:
    """Runs one write only if the write lock is free now; False when another writer holds
    it. For writes that may wait for a later request (renewing a sign-in's expiry) on a
    path that must never wait for the lock."""
    waits = db.execute("PRAGMA busy_timeout").fetchone()[0]
    db.execute("PRAGMA busy_timeout = 0")
    try:
        db.execute(sql, params)
    except sqlite3.OperationalError as exc:
        if not is_busy(exc):
            raise
        return False
    finally:
        db.execute(f"PRAGMA busy_timeout = {int(waits)}")
    return True


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
        # Weak: a connection goes (and closes) with its thread. The request thread
        # pools end idle threads and start new ones all day; holding every
        # connection ever made here would leak two file descriptors each time.
        self._all: weakref.WeakSet[Database] = weakref.WeakSet()
        self._lock = threading.Lock()
        self.write_probe = WriteProbe(path, busy_timeout_seconds)
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
                self._all.add(db)
        return db

    def close(self) -> None:
        with self._lock:
            for db in list(self._all):
                with contextlib.suppress(sqlite3.ProgrammingError):
                    db.close()
            self._all.clear()
        self._local = threading.local()


def is_busy(exc: sqlite3.Error) -> bool:
    """Whether the error is another writer holding the lock (past the busy timeout)."""
    code = getattr(exc, "sqlite_errorcode", None)
    return ((code is not None and code & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED))
            or "database is locked" in str(exc))


class WriteProbe:
    """Whether the database takes writes, for /readyz, which must answer without waiting.

    Each look takes the write lock without waiting and gives it straight back,
    writing nothing. Looks refused one after the other make a streak; only a
    streak longer than the busy timeout (what a write waits before it gives up)
    means the database refuses writes, so a writer holding the lock for a moment
    is not mistaken for one that holds it for good. A probe rather than a record
    of the requests' own writes: an idle service, or one its balancer has stopped
    sending requests to, still finds out, and sees the lock freed again.
    """

    def __init__(self, path: Path, patience_seconds: float):
        self.path = path
        self.patience_seconds = patience_seconds
        self._refused_since: float | None = None
        self._lock = threading.Lock()

    def problem(self) -> str | None:
        """Why the database does not take writes now; None when it does."""
        try:
            # mode=rw: a database that has gone away is a problem, not a new empty file.
            conn = sqlite3.connect(f"{self.path.absolute().as_uri()}?mode=rw", uri=True,
                                   timeout=0, isolation_level=None)
            try:
                conn.execute("BEGIN IMMEDIATE")
                conn.execute("ROLLBACK")
            finally:
                conn.close()
        except sqlite3.Error as exc:
            if not is_busy(exc):
                return problem_sentence(self.path, exc)
            now = time.monotonic()
            with self._lock:
                if self._refused_since is None:
                    self._refused_since = now
                refused_for = now - self._refused_since
            if refused_for <= self.patience_seconds:
                return None
            return (f"{self.path} has refused writes for {refused_for:.1f} s: another process"
                    " holds its write lock (a command or backup left open?)")
        with self._lock:
            self._refused_since = None
        return None


def problem_sentence(path: Path, exc: sqlite3.Error) -> str:
    """What is wrong with the database file, and what to do, in one line for the operator."""
    code = getattr(exc, "sqlite_errorcode", None)
    primary = code & 0xFF if code is not None else None
    if primary == sqlite3.SQLITE_NOTADB or "file is not a database" in str(exc):
        return (f"{path} is not a SQLite database ({exc}): restore it from a backup"
                " (appliance restore BACKUP) or move it away and run appliance init")
    if primary == sqlite3.SQLITE_CORRUPT or "malformed" in str(exc):
        return (f"{path} is damaged ({exc}): restore it from a backup (appliance restore"
                " BACKUP) or move it away and run appliance init")
    if is_busy(exc):
        return (f"{path} is locked by another writer ({exc}): try again once the other"
                " command or backup has finished")
    if primary == sqlite3.SQLITE_FULL:
        return f"the disk holding {path} is full ({exc}): free some space and try again"
    if primary in (sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_PERM, sqlite3.SQLITE_READONLY,
                   sqlite3.SQLITE_AUTH):
        return (f"{path} cannot be opened for reading and writing ({exc}): user"
                f" {getpass.getuser()} must be able to read and write it and its folder")
    return f"{path} cannot be used: {exc}"
