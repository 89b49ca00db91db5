"""The clean-ups the scheduler runs: each is idempotent and says what it removed.

Every function takes the current time from a clock it is given, so the
retention boundaries can be tested at exact ages.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from appliance.accounts import signin
from appliance.accounts.signin import SignInLimits
from appliance.core.clock import Clock, utc_clock, utc_iso
from appliance.core.config import Config
from appliance.core.database import ConnectionPool, immediate

log = logging.getLogger(__name__)

# Jobs are pruned a slice at a time so the write lock is never held for long.
PRUNE_SLICE = 200

# A PNG is written to a temporary file and renamed into place in milliseconds;
# one this old was left by a process killed mid-write and will never be renamed.
# The age alone decides, not whose file it is: in cluster mode the images folder
# is shared, and the one node that runs the clean-up must leave every other node's
# writes under way alone. They are all seconds old at most, whichever node makes
# them, while a file left by a dead node must still go though that node never
# comes back. Safe as long as the nodes' clocks and the file server's agree within
# the hour (NTP keeps them within milliseconds), far more than a client's cached
# file attributes lag (NFS: a minute at most).
PARTIAL_FILE_AGE = timedelta(hours=1)


@dataclass(frozen=True)
class PrunedJobs:
    jobs: int = 0
    images: int = 0
    files: int = 0


class Housekeeping:
    def __init__(self, config: Config, database: ConnectionPool, clock: Clock = utc_clock):
        self.config = config
        self.database = database
        self.clock = clock

    def prune_audit(self) -> int:
        """Deletes audit rows more than `audit_retention_days` old; a row exactly that old stays."""
        days = self.config.housekeeping.audit_retention_days
        cutoff = utc_iso(self.clock() - timedelta(days=days))
        db = self.database.db()
        with immediate(db):
            removed = db.execute("DELETE FROM audit_log WHERE created_at < ?", [cutoff]).rowcount
        log.info("pruned %d audit rows older than %d days", removed, days,
                 extra={"event": "housekeeping.audit", "removed": removed, "cutoff": cutoff})
        return removed

    def prune_images(self) -> PrunedJobs:
        """Deletes finished jobs older than `image_retention_days`: rows and PNG files.

        Files go first, then the rows, so an interruption leaves rows whose files
        are gone, which the next run deletes; never files without rows to find them.
        The credit ledger keeps every row; only its link to the deleted job is cleared.
        """
        days = self.config.housekeeping.image_retention_days
        if days == 0:
            return PrunedJobs()
        cutoff = utc_iso(self.clock() - timedelta(days=days))
        db = self.database.db()
        jobs = images = files = 0
        while True:
            job_ids = [row[0] for row in db.execute(
                "SELECT id FROM jobs WHERE finished_at IS NOT NULL AND finished_at < ?"
                " ORDER BY finished_at LIMIT ?", [cutoff, PRUNE_SLICE]).fetchall()]
            if not job_ids:
                break
            files += sum(self._delete_job_files(job_id) for job_id in job_ids)
            marks = ",".join("?" * len(job_ids))
            with immediate(db):
                db.execute(f"UPDATE credit_ledger SET job_id = NULL WHERE job_id IN ({marks})",
                           job_ids)
                images += db.execute(f"DELETE FROM job_images WHERE job_id IN ({marks})",
                                     job_ids).rowcount
                jobs += db.execute(f"DELETE FROM jobs WHERE id IN ({marks})", job_ids).rowcount
        log.info("pruned %d jobs, %d image rows and %d files finished more than %d days ago",
                 jobs, images, files, days,
                 extra={"event": "housekeeping.images", "jobs": jobs, "images": images,
                        "files": files, "cutoff": cutoff})
        return PrunedJobs(jobs, images, files)

    def _delete_job_files(self, job_id: str) -> int:
        folder = self.config.images_dir / job_id
        # A job id comes from our own database, but a path must never escape the folder.
        if folder.parent != self.config.images_dir or not folder.is_dir():
            return 0
        count = sum(1 for path in folder.iterdir() if path.is_file())
        shutil.rmtree(folder, ignore_errors=True)
        return count

    def remove_partial_files(self) -> int:
        """Deletes the temporary files of PNG writes cut off by a crash; returns how many."""
        cutoff = (self.clock() - PARTIAL_FILE_AGE).timestamp()
        removed = 0
        # Named like ".3.k2j4h1.tmp" beside the job's PNGs (see write_png_atomic).
        for path in self.config.images_dir.glob("*/.*.tmp"):
            try:
                if path.is_file() and path.stat().st_mtime < cutoff:
                    path.unlink()
                    removed += 1
            except FileNotFoundError:  # gone meanwhile: a job pruned at the same moment
                continue
        log.info("removed %d partial image files left by interrupted writes", removed,
                 extra={"event": "housekeeping.partial_files", "removed": removed})
        return removed

    def prune_console_sessions(self) -> int:
        """Deletes console sessions past their expiry (the session store refuses them already),
        and failed sign-in counts that can no longer matter."""
        now = self.clock()
        db = self.database.db()
        with immediate(db):
            removed = db.execute(
                "DELETE FROM console_sessions WHERE expires_at IS NOT NULL AND expires_at <= ?",
                [utc_iso(now)]).rowcount
            forgotten = signin.forget_stale(db, now, SignInLimits.from_config(self.config.console))
        log.info("deleted %d expired console sign-ins and %d stale failed sign-in counts",
                 removed, forgotten,
                 extra={"event": "housekeeping.console", "removed": removed,
                        "forgotten": forgotten})
        return removed

    def sqlite_upkeep(self) -> tuple[int, int]:
        """Refreshes the query planner's statistics and folds the WAL back into the database.

        Returns the WAL file's size in bytes before and after: TRUNCATE empties it
        unless a reader still holds part of it.
        """
        db = self.database.db()
        assert self.database.path is not None, "SQLite only"
        wal = Path(f"{self.database.path}-wal")
        before = wal.stat().st_size if wal.exists() else 0
        # optimize may write (ANALYZE): as a plain statement it starts as a reader
        # and fails at once ("database is locked") when another connection commits
        # meanwhile; holding the write lock from the start makes it wait its turn.
        with immediate(db):
            db.execute("PRAGMA optimize")
        # A checkpoint cannot run inside a transaction.
        busy = db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
        after = wal.stat().st_size if wal.exists() else 0
        log.info("database upkeep: optimized; WAL folded back from %d to %d bytes%s", before, after,
                 " (a reader was busy; the rest goes next time)" if busy else "",
                 extra={"event": "housekeeping.sqlite", "wal_bytes_before": before,
                        "wal_bytes_after": after, "busy": bool(busy)})
        return before, after
