"""APScheduler jobs: the housekeeping, at startup and then on a fixed period.

The jobs run on the event loop's thread pool, so the database work never
blocks requests. Each runs once as soon as the scheduler starts, to make up
for the time the service was down.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.interval import IntervalTrigger

from appliance.ops.housekeeping import Housekeeping

log = logging.getLogger(__name__)
# APScheduler logs every run at INFO; the jobs log what they did themselves.
logging.getLogger("apscheduler").setLevel(logging.WARNING)

DAILY = timedelta(days=1)
HOURLY = timedelta(hours=1)


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
            ("sqlite-upkeep", housekeeping.sqlite_upkeep, DAILY),
        ]
        now = datetime.now(UTC)
        for job_id, func, period in jobs:
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
