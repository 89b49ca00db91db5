"""The database: SQLite's file (the default) or PostgreSQL (cluster mode).

A connection per thread, write transactions, and the databases' troubles in words.
The store layer's SQL is written once, with `?` placeholders; what differs between
the two databases is confined to this module, `postgres.py` and the two schemas.
"""

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
from typing import Any, Protocol

import psycopg
import sqlite_utils

from appliance.core import postgres, schema_postgres
from appliance.core.database_url import DatabaseUrl
from appliance.core.files import private_file
from appliance.core.schema import migrations

BUSY_TIMEOUT_SECONDS = 10.0
# Both schemas begin with it: a database that has just had it applied was empty.
FIRST_MIGRATION = "m001_initial"

# What a database may raise, whichever it is; the store layer and the front ends
# catch these rather than one library's classes.
DatabaseError: tuple[type[Exception], ...] = (sqlite3.Error, psycopg.Error)
IntegrityError: tuple[type[Exception], ...] = (sqlite3.IntegrityError, psycopg.IntegrityError)
# Passing trouble worth trying again: a lock held too long, a server restarting.
OperationalError: tuple[type[Exception], ...] = (sqlite3.OperationalError,
                                                 psycopg.OperationalError)


class Database(Protocol):
    """What the store layer uses of a connection, on either database."""

    dialect: str
    # Hints for SQLite's planner, which joins and picks indexes as told; nothing in
    # PostgreSQL, whose planner chooses from statistics (see jobs/store.py's gallery).
    join_in_written_order: str
    not_by_index: str

    def execute(self, sql: str, parameters: Sequence[Any] | None = None, /) -> Any: ...

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]], /) -> Any: ...

    def query(self, sql: str, parameters: Sequence[Any] | None = None, /
              ) -> Iterator[dict[str, Any]]: ...

    def executescript(self, sql: str, /) -> Any: ...

    @property
    def in_transaction(self) -> bool: ...

    @property
    def usable(self) -> bool: ...

    def begin_writing(self) -> None: ...

    def commit(self) -> None: ...

    def rollback(self) -> None: ...

    def close(self) -> None: ...


class SqliteDatabase(sqlite_utils.Database):
    dialect = "sqlite"
    usable = True
    # CROSS JOIN keeps the tables in the order written; a unary + before a column
    # keeps the planner off that column's index.
    join_in_written_order = "CROSS JOIN"
    not_by_index = "+"

    @property
    def in_transaction(self) -> bool:
        return self.conn.in_transaction

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]], /) -> Any:
        return self.conn.executemany(sql, rows)

    def begin_writing(self) -> None:
        self.execute("BEGIN IMMEDIATE")

    def commit(self) -> None:
        self.conn.commit()

    def rollback(self) -> None:
        self.conn.rollback()


def open_database(path: Path, busy_timeout_seconds: float = BUSY_TIMEOUT_SECONDS
                  ) -> SqliteDatabase:
    # Made owner-only before SQLite opens it: SQLite gives the -wal and -shm files
    # the database's own permissions, so all three stay private whatever the umask.
    private_file(path)
    conn = sqlite3.connect(str(path), timeout=busy_timeout_seconds)
    db = SqliteDatabase(conn)
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


def connect(target: Path | DatabaseUrl,
            busy_timeout_seconds: float = BUSY_TIMEOUT_SECONDS) -> Database:
    """A new connection to the configured database, whichever it is."""
    if isinstance(target, DatabaseUrl):
        return postgres.connect(target, busy_timeout_seconds)
    return open_database(target, busy_timeout_seconds)


def migrate(db: Database) -> list[str]:
    """Applies the schema's pending migrations; returns their names."""
    if isinstance(db, SqliteDatabase):
        names = [m.name for m in migrations.pending(db)]
        migrations.apply(db)
        return names
    assert isinstance(db, postgres.PostgresDatabase)
    return schema_postgres.apply(db, _take_migration_lock)


def pending_migrations(db: Database) -> list[str]:
    if isinstance(db, SqliteDatabase):
        return [m.name for m in migrations.pending(db)]
    assert isinstance(db, postgres.PostgresDatabase)
    return schema_postgres.pending(db)


def _take_migration_lock(db: postgres.PostgresDatabase) -> None:
    db.execute(f"SELECT pg_advisory_xact_lock({postgres.MIGRATION_LOCK})")


def insert(db: Database, sql: str, params: Sequence[Any]) -> int:
    """Runs an INSERT into a table with an `id` column and returns the new row's id."""
    if db.dialect == "postgresql":
        return int(db.execute(f"{sql} RETURNING id", params).fetchone()[0])
    row_id = db.execute(sql, params).lastrowid
    if row_id is None:  # an INSERT into a rowid table always makes one
        raise sqlite3.InterfaceError(f"no row was inserted by {sql!r}")
    return int(row_id)


def like_escaped(text: str) -> str:
    """Text to find as itself in a LIKE pattern written with ESCAPE '!'."""
    return text.replace("!", "!!").replace("%", "!%").replace("_", "!_")


def unless_busy(db: Database, sql: str, params: list) -> bool:
    """Runs one write only if the write lock is free now; False when another writer holds
    it. For writes that may wait for a later request (renewing a sign-in's expiry) on a
    path that must never wait for the lock."""
    if isinstance(db, postgres.PostgresDatabase):
        return _unless_busy_postgres(db, sql, params)
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


def _unless_busy_postgres(db: postgres.PostgresDatabase, sql: str, params: list) -> bool:
    # A plain write takes no write lock in PostgreSQL, only its row's: wait for that
    # one for a moment at most.
    db.execute("BEGIN; SET LOCAL lock_timeout = '50ms'")
    try:
        db.execute(sql, params)
        db.commit()
    except BaseException as exc:
        with contextlib.suppress(*DatabaseError):
            db.rollback()
        if not (isinstance(exc, psycopg.Error) and is_busy(exc)):
            raise
        return False
    return True


@contextlib.contextmanager
def immediate(db: Database) -> Iterator[Database]:
    """A write transaction that takes the write lock up front.

    Read-then-write sequences (check credits, then charge) must not start as
    readers: two of them could both read the old balance. Inside another
    `immediate` block it joins that transaction through a savepoint, so a
    caller can make several services' writes one all-or-nothing unit.
    In PostgreSQL the write lock is an advisory lock held to the transaction's
    end, shared by every node: the same one-writer-at-a-time as SQLite's file lock.
    """
    if db.in_transaction:
        with _savepoint(db):
            yield db
        return
    try:
        db.begin_writing()
        yield db
        # A COMMIT can fail too (a full disk); what it leaves open is rolled back below.
        db.commit()
    except BaseException:
        # The original error matters, not a failed rollback (SQLite may have
        # rolled back by itself already; a PostgreSQL connection may be gone).
        with contextlib.suppress(*DatabaseError):
            db.rollback()
        raise


@contextlib.contextmanager
def _savepoint(db: Database) -> Iterator[None]:
    name = f"nested_{next(_savepoint_numbers)}"
    db.execute(f"SAVEPOINT {name}")
    try:
        yield
    except BaseException:
        if db.in_transaction:
            with contextlib.suppress(*DatabaseError):
                db.execute(f"ROLLBACK TO {name}")
                db.execute(f"RELEASE {name}")
        raise
    db.execute(f"RELEASE {name}")


_savepoint_numbers = itertools.count()


class ConnectionPool:
    """Hands each thread its own connection to one database.

    sqlite3 connections must stay on the thread that made them; the request
    thread pool, the event loop and the engine worker each get their own. A
    PostgreSQL connection is kept per thread too, so that a transaction's
    statements, made by several store functions, share it without being passed
    a connection out of a pool; one the server dropped is replaced on next use.
    """

    def __init__(self, target: Path | DatabaseUrl,
                 busy_timeout_seconds: float = BUSY_TIMEOUT_SECONDS):
        self.target = target
        self.busy_timeout_seconds = busy_timeout_seconds
        self._local = threading.local()
        # Weak: a connection goes (and closes) with its thread. The request thread
        # pools end idle threads and start new ones all day; holding every
        # connection ever made here would leak two file descriptors each time.
        self._all: weakref.WeakSet[Any] = weakref.WeakSet()
        self._lock = threading.Lock()
        self.write_probe: WriteProbe | postgres.PostgresProbe = (
            postgres.PostgresProbe(target) if isinstance(target, DatabaseUrl)
            else WriteProbe(target, busy_timeout_seconds))
        migrate(self.db())

    @property
    def path(self) -> Path | None:
        """The SQLite file; None in cluster mode."""
        return self.target if isinstance(self.target, Path) else None

    def __deepcopy__(self, memo: dict) -> ConnectionPool:
        # One pool per database: the copies Litestar makes of the routes
        # and middleware that hold it must share it, not clone its connections.
        return self

    def db(self) -> Database:
        db = getattr(self._local, "db", None)
        if db is None or not db.usable:
            db = connect(self.target, self.busy_timeout_seconds)
            self._local.db = db
            with self._lock:
                self._all.add(db)
        return db

    def close(self) -> None:
        with self._lock:
            for db in list(self._all):
                with contextlib.suppress(sqlite3.ProgrammingError, *DatabaseError):
                    db.close()
            self._all.clear()
        self._local = threading.local()


def is_busy(exc: BaseException) -> bool:
    """Whether the error is another writer holding the lock (past the busy timeout)."""
    if isinstance(exc, psycopg.Error):
        return postgres.is_busy(exc)
    code = getattr(exc, "sqlite_errorcode", None)
    return ((code is not None and code & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED))
            or "database is locked" in str(exc))


def is_unreachable(exc: BaseException) -> bool:
    """Whether the database server cannot be reached now (cluster mode): answered 503."""
    return isinstance(exc, psycopg.Error) and postgres.is_unreachable(exc)


def is_full(exc: BaseException) -> bool:
    if isinstance(exc, psycopg.Error):
        return postgres.is_full(exc)
    code = getattr(exc, "sqlite_errorcode", None)
    return code is not None and code & 0xFF == sqlite3.SQLITE_FULL


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


def problem_sentence(target: Path | DatabaseUrl, exc: BaseException) -> str:
    """What is wrong with the database, and what to do, in one line for the operator."""
    if isinstance(target, DatabaseUrl):
        return postgres.problem_sentence(target, exc)
    path = target
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
