"""The scheduler's record of housekeeping runs in cluster mode (PostgreSQL only).

Every node schedules every housekeeping job; the first node to reach a job in a
period runs it, and the others skip it. A job's run is guarded by an advisory
lock of its own, so that nodes that reach the job at the same moment do not both
run it, and recorded in `scheduled_runs`, so that a node that reaches it later in
the period skips it. Times are the database's clock: the nodes' clocks may differ.

The store functions take a connection, as the other stores' do.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass

from appliance.core.database import Database, DatabaseError


@dataclass(frozen=True)
class LastRun:
    """What the database says of a job: who ran it last and when (None: never), and now."""

    node: str | None
    ran_at: float | None
    now: float

    def age(self) -> float | None:
        return None if self.ran_at is None else self.now - self.ran_at


def lock_key(job: str) -> int:
    """The job's advisory lock: a signed 64-bit number derived from its name, so that each
    job has its own lock and no list of keys must be kept. A 64-bit digest meets the
    fixed keys in core/postgres.py (or another job's) with odds of about 2^-64."""
    digest = hashlib.sha256(f"appliance.scheduled-run:{job}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


@contextlib.contextmanager
def job_lock(db: Database, job: str) -> Iterator[bool]:
    """Tries the job's lock without waiting; yields whether this connection holds it.

    A session-level lock, not a transaction's: a job's work is several transactions
    (prune-images commits slice by slice, with file deletions between them), and one
    transaction around it all would hold the write lock (`immediate`'s, shared by every
    node) for the whole job. If the connection is lost meanwhile, the server releases
    the lock with it.
    """
    key = lock_key(job)
    held = bool(db.execute("SELECT pg_try_advisory_lock(?)", [key]).fetchone()[0])
    try:
        yield held
    finally:
        if held and db.usable:
            # The job may have left the connection unusable; its lock went with it then.
            with contextlib.suppress(*DatabaseError):
                db.execute("SELECT pg_advisory_unlock(?)", [key])


def last_run(db: Database, job: str) -> LastRun:
    """The job's last recorded run and the database's time now, epoch seconds."""
    node, ran_at, now = db.execute(
        "SELECT runs.node, runs.ran_at, clock.now"
        " FROM (SELECT extract(epoch FROM clock_timestamp())::double precision AS now) AS clock"
        " LEFT JOIN scheduled_runs AS runs ON runs.job = ?", [job]).fetchone()
    return LastRun(node, ran_at, now)


def record_run(db: Database, job: str, node: str, ran_at: float) -> None:
    db.execute("INSERT INTO scheduled_runs (job, node, ran_at) VALUES (?, ?, ?)"
               " ON CONFLICT (job) DO UPDATE SET node = excluded.node, ran_at = excluded.ran_at",
               [job, node, ran_at])
