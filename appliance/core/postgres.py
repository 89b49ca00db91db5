"""PostgreSQL for cluster mode: a connection that answers the store layer as SQLite's does.

The store layer's SQL is written once, with `?` placeholders, and runs on both
databases; what differs is here and in `core/database.py`: placeholders, the
new row's id, the write lock, and the words for a failure.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import psycopg
from psycopg import adapt, pq
from psycopg.rows import dict_row

from appliance.core.database_url import DatabaseUrl
from appliance.core.errors import BadRequest

# Seconds a new connection waits for the server before it is a failure (a request
# answered 503, a probe that says the database cannot be reached).
CONNECT_TIMEOUT_SECONDS = 5

# Advisory lock keys (any two 64-bit numbers that no one else uses in this database).
# WRITE_LOCK serializes write transactions as SQLite's one writer does: every
# read-then-write sequence (check credits, then charge) was written for that.
WRITE_LOCK = 0x61_70_70_6C_69_01
MIGRATION_LOCK = 0x61_70_70_6C_69_02

T = TypeVar("T")


class PostgresDatabase:
    """One connection, in autocommit, with the store layer's methods.

    Statements outside `immediate` commit on their own, as sqlite-utils' do;
    `immediate` opens a transaction with BEGIN and takes the write lock.
    """

    dialect = "postgresql"
    join_in_written_order = "JOIN"
    not_by_index = ""

    def __init__(self, open_connection: Callable[[], psycopg.Connection[Any]]):
        self._open = open_connection
        self.conn = open_connection()

    def execute(self, sql: str, parameters: Sequence[Any] | None = None) -> psycopg.Cursor[Any]:
        if parameters is None:
            query: bytes | str = sql.encode()  # as written: no placeholders to read
        else:
            query, parameters = placeholders(sql), without_nul(parameters)
        if self.in_transaction:
            return self.conn.execute(query, parameters)
        return self._again_if_dropped(lambda: self.conn.execute(query, parameters),
                                      reads=sql.lstrip()[:6].upper() == "SELECT")

    def _again_if_dropped(self, statement: Callable[[], T], reads: bool = True) -> T:
        """Runs a statement once more, on a new connection, when the server had dropped
        this one while it sat idle (a restart of the database): else the first use of
        every such connection would fail. Only when running it twice cannot do harm: the
        server said it had ended the connection before the statement came (so it never ran),
        or the statement changes nothing (a read, BEGIN)."""
        try:
            return statement()
        except psycopg.OperationalError as exc:
            ended_before = isinstance(exc, psycopg.errors.AdminShutdown
                                      | psycopg.errors.CrashShutdown)
            if not self.conn.broken or not (reads or ended_before):
                raise
            self.conn.close()
            self.conn = self._open()
            return statement()

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        def run() -> None:
            with self.conn.cursor() as cursor:
                cursor.executemany(placeholders(sql), [without_nul(row) for row in rows])

        if self.in_transaction:
            run()
        else:
            self._again_if_dropped(run, reads=False)

    def query(self, sql: str, parameters: Sequence[Any] | None = None) -> Iterator[dict[str, Any]]:
        def rows() -> list[dict[str, Any]]:
            with self.conn.cursor(row_factory=dict_row) as cursor:
                cursor.execute(placeholders(sql), without_nul(parameters or ()))
                return cursor.fetchall()

        yield from (rows() if self.in_transaction else self._again_if_dropped(rows))

    def executescript(self, sql: str) -> None:
        self.conn.execute(sql.encode())

    @property
    def in_transaction(self) -> bool:
        return self.conn.info.transaction_status != pq.TransactionStatus.IDLE

    @property
    def usable(self) -> bool:
        """False once the server closed or lost the connection: the pool makes a new one."""
        return not (self.conn.closed or self.conn.broken)

    def begin_writing(self) -> None:
        # One round trip: BEGIN and the lock, as a script.
        self._again_if_dropped(lambda: self.conn.execute(
            f"BEGIN; SELECT pg_advisory_xact_lock({WRITE_LOCK})".encode()))

    def commit(self) -> None:
        if self.in_transaction:
            self.conn.execute(b"COMMIT")

    def rollback(self) -> None:
        if self.in_transaction and self.usable:
            self.conn.execute(b"ROLLBACK")

    def close(self) -> None:
        self.conn.close()


def connect(url: DatabaseUrl, lock_timeout_seconds: float,
            connect_timeout_seconds: float = CONNECT_TIMEOUT_SECONDS) -> PostgresDatabase:
    def open_connection() -> psycopg.Connection[Any]:
        conn = psycopg.connect(
            url.url, autocommit=True, connect_timeout=max(1, round(connect_timeout_seconds)),
            application_name="appliance",
            # A write waits this long for the write lock (or a row another holds), as a
            # SQLite write waits for the file's lock: past it, the request is answered 503.
            options=f"-c lock_timeout={int(lock_timeout_seconds * 1000)} -c timezone=UTC")
        conn.adapters.register_loader("numeric", _WholeOrFractionLoader)
        return conn

    return PostgresDatabase(open_connection)


class _WholeOrFractionLoader(adapt.Loader):
    """SUM() of integers is numeric in PostgreSQL: an int here, as SQLite's is, so that
    balances and counts stay ints in JSON."""

    def load(self, data: Any) -> int | float:
        text = bytes(data).decode()
        try:
            return int(text)
        except ValueError:
            return float(text)


def without_nul(parameters: Sequence[Any]) -> Sequence[Any]:
    """PostgreSQL's text cannot hold U+0000 (SQLite's can): text that carries it is the
    client's bad input, refused with a 400 before it reaches the server."""
    for value in parameters:
        if isinstance(value, str) and "\x00" in value:
            raise BadRequest("text may not contain the NUL character (U+0000)")
    return parameters


@functools.lru_cache(maxsize=2048)
def placeholders(sql: str) -> str:
    """`?` becomes `%s`, and a literal `%` becomes `%%`, outside quoted text."""
    out: list[str] = []
    quote = ""
    for char in sql:
        if quote:
            out.append("%%" if char == "%" else char)
            if char == quote:
                quote = ""
        elif char in "'\"":
            quote = char
            out.append(char)
        elif char == "?":
            out.append("%s")
        elif char == "%":
            out.append("%%")
        else:
            out.append(char)
    return "".join(out)


def is_busy(exc: BaseException) -> bool:
    """Another writer held the lock past lock_timeout."""
    return isinstance(exc, psycopg.errors.LockNotAvailable | psycopg.errors.DeadlockDetected
                      | psycopg.errors.SerializationFailure)


def is_unreachable(exc: BaseException) -> bool:
    """The server is down, restarting, or cut off: passing trouble, answered 503."""
    return isinstance(exc, psycopg.OperationalError | psycopg.errors.AdminShutdown
                      | psycopg.errors.CannotConnectNow) and not is_busy(exc)


def is_full(exc: BaseException) -> bool:
    return isinstance(exc, psycopg.errors.DiskFull)


def problem_sentence(url: DatabaseUrl, exc: BaseException) -> str:
    detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    # libpq's messages name host and port, never the password; the URL is shown masked.
    if "authentication failed" in detail or "no pg_hba.conf entry" in detail:
        return (f"the database {url.shown} refused this appliance ({detail}): check the"
                " user and password in storage.database and the server's pg_hba.conf")
    if is_unreachable(exc):
        return (f"the database {url.shown} cannot be reached ({detail}): check that"
                " PostgreSQL runs there and that this machine may connect to it")
    if is_busy(exc):
        return (f"the database {url.shown} is busy ({detail}): another writer held its"
                " lock; try again")
    if is_full(exc):
        return f"the disk of the database {url.shown} is full ({detail})"
    return f"the database {url.shown} cannot be used: {detail}"


class PostgresProbe:
    """Whether the database takes writes, for /readyz: one connection of its own, kept,
    and a question that writes nothing (a server in recovery is read-only)."""

    def __init__(self, url: DatabaseUrl):
        self.url = url
        self._db: PostgresDatabase | None = None
        self._lock = threading.Lock()

    def problem(self) -> str | None:
        with self._lock:
            try:
                if self._db is None or not self._db.usable:
                    self._db = connect(self.url, 1.0, connect_timeout_seconds=2)
                row = self._db.execute("SELECT pg_is_in_recovery()").fetchone()
            except psycopg.Error as exc:
                if self._db is not None:
                    self._db.close()
                    self._db = None
                return problem_sentence(self.url, exc)
        if row and row[0]:
            return f"the database {self.url.shown} is a read-only standby"
        return None


class Listener:
    """Waits for notifications on one channel (LISTEN), on a connection of its own that it
    makes again after the server went away."""

    def __init__(self, url: DatabaseUrl, channel: str):
        self.url = url
        self.channel = channel
        self._conn: psycopg.Connection[Any] | None = None

    def wait(self, timeout: float) -> bool:
        """True when notified within `timeout` seconds; False after it, or on a failure
        (then after the timeout too: the caller looks at the database itself anyway)."""
        try:
            if self._conn is None or self._conn.closed or self._conn.broken:
                self._conn = psycopg.connect(self.url.url, autocommit=True,
                                             connect_timeout=CONNECT_TIMEOUT_SECONDS)
                self._conn.execute(f"LISTEN {self.channel}".encode())
            return any(True for _ in self._conn.notifies(timeout=timeout, stop_after=1))
        except psycopg.Error:
            self.close()
            threading.Event().wait(timeout)
            return False

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
