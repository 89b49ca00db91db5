"""APScheduler jobs: the housekeeping, at startup and then on a fixed period.

The jobs run on the event loop's thread pool, so the database work never
blocks requests. Each runs once as soon as the scheduler starts, to make up
for the time the service was down.

In cluster mode every node schedules every job, and each run first asks the
database whether another node has run it in this period (ops/scheduled_runs.py):
a job runs once per cluster per period, whichever node gets to it first.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.interval import IntervalTrigger

from appliance.ops import scheduled_runs
from appliance.ops.housekeeping import Housekeeping

log = logging.getLogger(__name__)
# APScheduler logs every run at INFO; the jobs log what they did themselves.
logging.getLogger("apscheduler").setLevel(logging.WARNING)

DAILY = timedelta(days=1)
HOURLY = timedelta(hours=1)
# In cluster mode a job runs again once its last run, on any node, is older than this
# share of its period. Not the whole period: each node's timer counts from the node's
# own start, so a node's next run comes due a little before a full period has passed
# by the database's clock, and must not skip the run the cluster is due.
RERUN_AFTER = 0.9


class Scheduler:
    def __init__(self, housekeeping: Housekeeping):
        self.housekeeping = housekeeping
        self.scheduler = AsyncIOScheduler(
            timezone=UTC,
            # After a long pause (a suspended VM) a job runs once, not once per missed period.
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": 3600},
        )
        self._idle = threading.Condition()
        self._running = 0
        self._stopped = False
        jobs: list[tuple[str, Callable[[], object], timedelta]] = [
            ("prune-audit", housekeeping.prune_audit, DAILY),
            ("prune-images", housekeeping.prune_images, DAILY),
            ("prune-console-sessions", housekeeping.prune_console_sessions, HOURLY),
            ("remove-partial-files", housekeeping.remove_partial_files, DAILY),
        ]
        if housekeeping.database.path is not None:
            # PostgreSQL keeps its own statistics and log (autovacuum, checkpoints).
            jobs.append(("sqlite-upkeep", housekeeping.sqlite_upkeep, DAILY))
        now = datetime.now(UTC)
        for job_id, func, period in jobs:
            if housekeeping.config.cluster_mode:
                func = self._once_per_cluster(job_id, func, period)
            self.scheduler.add_job(self._guarded(job_id, func),
                                   IntervalTrigger(seconds=int(period.total_seconds())),
                                   id=job_id, name=job_id, next_run_time=now)

    def _guarded(self, job_id: str, func: Callable[[], object]) -> Callable[[], None]:
        def run() -> None:
            with self._idle:
                if self._stopped:  # picked up by a thread after stop(): the database may be gone
                    return
                self._running += 1
            try:
                func()
            except Exception:
                log.exception("housekeeping job %s failed; it runs again at its next time", job_id,
                              extra={"event": "housekeeping.failed", "job": job_id})
            finally:
                with self._idle:
                    self._running -= 1
                    self._idle.notify_all()

        return run

    def _once_per_cluster(self, job_id: str, func: Callable[[], object],
                          period: timedelta) -> Callable[[], object]:
        database = self.housekeeping.database
        node = self.housekeeping.config.node_name

        def run() -> object:
            db = database.db()
            with scheduled_runs.job_lock(db, job_id) as held:
                if not held:
                    # The lock's holder is not known by name: the last run's node may be
                    # another, and the holder may only be finding the job done.
                    log.info("housekeeping job %s skipped: another node is running it or"
                             " checking it now", job_id,
                             extra={"event": "housekeeping.skipped", "job": job_id,
                                    "reason": "running"})
                    return None
                last = scheduled_runs.last_run(db, job_id)
                age = last.age()
                if age is not None and age < RERUN_AFTER * period.total_seconds():
                    log.info("housekeeping job %s skipped: node %s ran it %.0f s ago", job_id,
                             last.node, age,
                             extra={"event": "housekeeping.skipped", "job": job_id,
                                    "reason": "recent", "ran_by": last.node,
                                    "age_seconds": round(age)})
                    return None
                result = func()
                # Recorded only once it has succeeded: a run that failed is tried again
                # by the next node whose timer comes due, not a period later. The time
                # is when it started, so that the period is counted as the timers count it.
                scheduled_runs.record_run(db, job_id, node, last.now)
                return result

        return run

    def job_ids(self) -> list[str]:
        return sorted(job.id for job in self.scheduler.get_jobs())

    def start(self) -> None:
        self.scheduler.start()

    async def stop(self, timeout: float = 30.0) -> None:
        """Stops new runs, then waits for a running job so it never outlives the database."""
        with self._idle:
            self._stopped = True
        # Shut down only once no job runs: shutting down cancels the futures of
        # running jobs, which APScheduler then reports as errors.
        await asyncio.to_thread(self._wait_idle, timeout)
        if self.scheduler.running:
            self.scheduler.shutdown(wait=False)

    def _wait_idle(self, timeout: float) -> None:
        with self._idle:
            if not self._idle.wait_for(lambda: self._running == 0, timeout):
                log.warning("a housekeeping job was still running at shutdown")
