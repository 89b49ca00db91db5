"""The SQLite database: connections, transactions and the schema."""

from __future__ import annotations

import contextlib
import itertools
import sqlite3
import threading
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

from sqlite_utils import Database
from sqlite_utils.migrations import Migrations

BUSY_TIMEOUT_SECONDS = 10.0

migrations = Migrations("appliance")


def utc_now() -> str:
    """ISO 8601 UTC with milliseconds; sorts as text in time order."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def utc_iso(moment: datetime) -> str:
    """An aware datetime in utc_now()'s format, e.g. for an expiry time."""
    return moment.astimezone(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


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


class Store:
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


@migrations()
def m001_initial(db: Database) -> None:
    db.executescript(
        """
        CREATE TABLE accounts (
            id INTEGER PRIMARY KEY,
            email TEXT NOT NULL UNIQUE COLLATE NOCASE,
            password_hash TEXT,
            is_admin INTEGER NOT NULL DEFAULT 0,
            credits INTEGER NOT NULL DEFAULT 0 CHECK (credits >= 0),
            created_at TEXT NOT NULL,
            disabled_at TEXT
        );
        CREATE TABLE api_keys (
            id INTEGER PRIMARY KEY,
            account_id INTEGER NOT NULL REFERENCES accounts(id),
            name TEXT NOT NULL,
            key_hash TEXT NOT NULL UNIQUE,
            prefix TEXT NOT NULL,
            created_at TEXT NOT NULL,
            last_used_at TEXT,
            deleted_at TEXT
        );
        CREATE INDEX api_keys_account ON api_keys(account_id);
        CREATE TABLE jobs (
            id TEXT PRIMARY KEY,
            account_id INTEGER NOT NULL REFERENCES accounts(id),
            api_key_id INTEGER REFERENCES api_keys(id),
            status TEXT NOT NULL,
            total_images INTEGER NOT NULL,
            credits_used INTEGER NOT NULL,
            credits_refunded INTEGER NOT NULL DEFAULT 0,
            settings TEXT NOT NULL,
            created_at TEXT NOT NULL,
            started_at TEXT,
            finished_at TEXT
        );
        CREATE INDEX jobs_account ON jobs(account_id, created_at);
        CREATE TABLE job_images (
            id INTEGER PRIMARY KEY,
            job_id TEXT NOT NULL REFERENCES jobs(id),
            idx INTEGER NOT NULL,
            prompt TEXT NOT NULL,
            seed INTEGER NOT NULL,
            status TEXT NOT NULL,
            file TEXT,
            error TEXT,
            started_at TEXT,
            finished_at TEXT,
            UNIQUE (job_id, idx)
        );
        CREATE INDEX job_images_status ON job_images(status);
        CREATE TABLE credit_ledger (
            id INTEGER PRIMARY KEY,
            account_id INTEGER NOT NULL REFERENCES accounts(id),
            delta INTEGER NOT NULL,
            balance_after INTEGER NOT NULL CHECK (balance_after >= 0),
            reason TEXT NOT NULL,
            job_id TEXT REFERENCES jobs(id),
            created_at TEXT NOT NULL
        );
        CREATE INDEX credit_ledger_account ON credit_ledger(account_id, id);
        CREATE TABLE audit_log (
            id INTEGER PRIMARY KEY,
            created_at TEXT NOT NULL,
            account_id INTEGER REFERENCES accounts(id),
            action TEXT NOT NULL,
            api_key_id INTEGER REFERENCES api_keys(id),
            ip_address TEXT,
            user_agent TEXT,
            details TEXT
        );
        CREATE INDEX audit_log_created ON audit_log(created_at);
        CREATE INDEX audit_log_account ON audit_log(account_id, created_at);
        """
    )


@migrations()
def m002_console_sessions(db: Database) -> None:
    # Server-side console sessions. Only a digest of the session id is stored,
    # so the database cannot be used to take over a signed-in browser.
    db.executescript(
        """
        CREATE TABLE console_sessions (
            key_hash TEXT PRIMARY KEY,
            value BLOB NOT NULL,
            expires_at TEXT
        );
        CREATE INDEX console_sessions_expires ON console_sessions(expires_at);
        """
    )


@migrations()
def m003_job_base_seed(db: Database) -> None:
    # The base seed a client asked for, echoed in the job's status; NULL when
    # each image drew its own random seed.
    db.execute("ALTER TABLE jobs ADD COLUMN seed INTEGER")


@migrations()
def m004_idempotency_keys(db: Database) -> None:
    # The first answer to each POST that carried an Idempotency-Key, so that a
    # retry gets it again instead of a second charge. Only a digest of the
    # client's key is kept; rows older than a day are ignored, then deleted.
    db.executescript(
        """
        CREATE TABLE idempotency_keys (
            account_id INTEGER NOT NULL REFERENCES accounts(id),
            key_hash TEXT NOT NULL,
            request_hash TEXT NOT NULL,
            job_id TEXT NOT NULL,
            response TEXT NOT NULL,
            created_at TEXT NOT NULL,
            PRIMARY KEY (account_id, key_hash)
        );
        CREATE INDEX idempotency_keys_created ON idempotency_keys(created_at);
        """
    )
