"""Cluster mode's housekeeping: nodes sharing one PostgreSQL database and one images folder
run each job once per cluster per period, and one node's clean-up of the shared folder
leaves the other nodes' writes under way alone."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest

from appliance.core.clock import utc_iso
from appliance.core.database import ConnectionPool
from appliance.ops import scheduled_runs
from appliance.ops.housekeeping import PARTIAL_FILE_AGE, Housekeeping
from appliance.ops.scheduler import DAILY, HOURLY, RERUN_AFTER, Scheduler

from .conftest import config_for_tests

PERIODS = {"prune-audit": DAILY, "prune-images": DAILY, "prune-console-sessions": HOURLY,
           "remove-partial-files": DAILY}
# The event each job logs when it has run, whichever node ran it.
RAN_EVENTS = {"housekeeping.audit": "prune-audit", "housekeeping.images": "prune-images",
              "housekeeping.console": "prune-console-sessions",
              "housekeeping.partial_files": "remove-partial-files"}
SKIPPED = "housekeeping.skipped"
FAILED = "housekeeping.failed"


class Cluster:
    """Nodes of one cluster in this process: each its own config (node name) and pool, all
    on one database and one images folder, as separate machines would be."""

    def __init__(self, url: str, folder: Path, tiny_model: Path,
                 caplog: pytest.LogCaptureFixture):
        self.url = url
        self.folder = folder
        self.tiny_model = tiny_model
        self.caplog = caplog
        self.pools: list[ConnectionPool] = []
        self.sql = psycopg.connect(url, autocommit=True)

    def node(self, name: str) -> Scheduler:
        config = config_for_tests(self.folder, self.tiny_model, database_url=self.url,
                                  cluster={"node_name": name},
                                  # Else prune-images returns at once and logs nothing.
                                  housekeeping={"image_retention_days": 30})
        pool = ConnectionPool(config.storage.database)
        self.pools.append(pool)
        return Scheduler(Housekeeping(config, pool))

    def start_together(self, *nodes: Scheduler) -> None:
        """Starts the nodes' schedulers at once and stops them once each node has run or
        skipped each job at startup."""
        expected = len(PERIODS) * len(nodes)
        first = len(self.caplog.records)

        async def run() -> None:
            for node in nodes:
                node.start()
            deadline = time.monotonic() + 20
            while len(self.outcomes(first)) < expected:
                assert time.monotonic() < deadline, self.outcomes(first)
                await asyncio.sleep(0.01)
            for node in nodes:
                await node.stop()

        asyncio.run(run())
        self.since = first

    def outcomes(self, first: int = 0) -> list[logging.LogRecord]:
        return [record for record in self.caplog.records[first:]
                if getattr(record, "event", None) in (*RAN_EVENTS, SKIPPED, FAILED)]

    def ran(self) -> Counter[str]:
        """How many times each job ran in the last start_together."""
        return Counter(RAN_EVENTS[record.event] for record in self.outcomes(self.since)
                       if record.event in RAN_EVENTS)

    def failed(self) -> list[str]:
        return [record.job for record in self.outcomes(self.since) if record.event == FAILED]

    def skipped(self) -> list[logging.LogRecord]:
        return [record for record in self.outcomes(self.since) if record.event == SKIPPED]

    def runs(self) -> dict[str, tuple[str, float]]:
        return {job: (node, ran_at) for job, node, ran_at in
                self.sql.execute("SELECT job, node, ran_at FROM scheduled_runs")}

    def close(self) -> None:
        self.sql.close()
        for pool in self.pools:
            pool.close()


@pytest.fixture
def cluster(postgres, tmp_path, tiny_model, caplog) -> Iterator[Cluster]:
    caplog.set_level(logging.INFO, logger="appliance.ops")
    cluster = Cluster(postgres.new_database(), tmp_path, tiny_model, caplog)
    yield cluster
    cluster.close()


def test_nodes_started_together_run_each_job_once(cluster):
    a, b = cluster.node("node-a"), cluster.node("node-b")
    assert a.job_ids() == sorted(PERIODS)  # no SQLite upkeep on PostgreSQL
    old = utc_iso(datetime.now(UTC) - timedelta(days=200))
    cluster.sql.execute("INSERT INTO audit_log (created_at, action) VALUES (%s, 'ancient')",
                        [old])

    cluster.start_together(a, b)

    assert cluster.ran() == dict.fromkeys(PERIODS, 1)
    runs = cluster.runs()
    assert set(runs) == set(PERIODS)
    assert {node for node, _ in runs.values()} <= {"node-a", "node-b"}
    # The other node skipped each job: it found the lock taken, or the run just recorded,
    # and then it names the node that ran it.
    skipped = cluster.skipped()
    assert sorted(record.job for record in skipped) == sorted(PERIODS)
    for record in skipped:
        assert record.levelno == logging.INFO
        if record.reason == "recent":
            assert record.ran_by == runs[record.job][0]
            assert f"node {record.ran_by} ran it" in record.getMessage()
    # The job ran for real, once.
    assert cluster.sql.execute("SELECT COUNT(*) FROM audit_log").fetchone()[0] == 0


def test_a_node_within_the_period_skips_and_one_after_it_runs_again(cluster):
    cluster.start_together(cluster.node("node-a"))
    assert cluster.ran() == dict.fromkeys(PERIODS, 1)
    first = cluster.runs()

    # Another node, or node-a restarted, within the period: nothing runs again.
    for name in ("node-b", "node-a"):
        cluster.start_together(cluster.node(name))
        assert cluster.ran() == {}
        assert sorted((record.job, record.ran_by) for record in cluster.skipped()) == [
            (job, "node-a") for job in sorted(PERIODS)]
        assert any(re.fullmatch(
            r"housekeeping job prune-audit skipped: node node-a ran it \d+ s ago",
            record.getMessage()) for record in cluster.skipped())
    assert cluster.runs() == first

    # A minute short of the share of the period: still skipped.
    for job, period in PERIODS.items():
        cluster.sql.execute("UPDATE scheduled_runs SET ran_at = ran_at - %s WHERE job = %s",
                            [RERUN_AFTER * period.total_seconds() - 60, job])
    cluster.start_together(cluster.node("node-b"))
    assert cluster.ran() == {}

    # Past it: the node that gets there runs each job again and records itself.
    cluster.sql.execute("UPDATE scheduled_runs SET ran_at = ran_at - 61")
    before = time.time()
    cluster.start_together(cluster.node("node-b"))
    assert cluster.ran() == dict.fromkeys(PERIODS, 1)
    again = cluster.runs()
    assert {node for node, _ in again.values()} == {"node-b"}
    # The database's clock, not this process's: they agree here within a few seconds.
    assert all(abs(ran_at - before) < 5 for _, ran_at in again.values())


def test_a_node_that_cannot_take_a_jobs_lock_skips_it(cluster):
    holder = psycopg.connect(cluster.url, autocommit=True)
    try:
        # Another node is running prune-audit now.
        holder.execute("SELECT pg_advisory_lock(%s)", [scheduled_runs.lock_key("prune-audit")])
        cluster.start_together(cluster.node("node-a"))
        assert cluster.ran() == {job: 1 for job in PERIODS if job != "prune-audit"}
        [skipped] = cluster.skipped()
        assert (skipped.job, skipped.reason) == ("prune-audit", "running")
        assert "another node is running it or checking it now" in skipped.getMessage()
        assert "prune-audit" not in cluster.runs()
    finally:
        holder.close()  # its end releases the lock, as a node's would
    cluster.start_together(cluster.node("node-a"))
    assert cluster.ran() == {"prune-audit": 1}
    # The locks taken by the runs were given back: another session takes them at once.
    other = psycopg.connect(cluster.url, autocommit=True)
    try:
        assert all(other.execute("SELECT pg_try_advisory_lock(%s)",
                                 [scheduled_runs.lock_key(job)]).fetchone()[0]
                   for job in PERIODS)
    finally:
        other.close()


def test_a_run_that_failed_is_not_recorded_and_the_next_node_runs_it(cluster):
    a = cluster.node("node-a")  # its pool makes the schema
    cluster.sql.execute("ALTER TABLE audit_log RENAME TO audit_log_away")
    cluster.start_together(a)
    assert cluster.failed() == ["prune-audit"]
    assert "prune-audit" not in cluster.runs()
    assert set(cluster.runs()) == set(PERIODS) - {"prune-audit"}

    cluster.sql.execute("ALTER TABLE audit_log_away RENAME TO audit_log")
    cluster.start_together(cluster.node("node-b"))
    assert cluster.ran() == {"prune-audit": 1}
    assert cluster.runs()["prune-audit"][0] == "node-b"


def test_each_job_has_a_lock_of_its_own():
    keys = {scheduled_runs.lock_key(job) for job in PERIODS}
    assert len(keys) == len(PERIODS)
    assert all(-(2 ** 63) <= key < 2 ** 63 for key in keys)
    assert scheduled_runs.lock_key("prune-audit") == scheduled_runs.lock_key("prune-audit")


def test_the_clean_up_leaves_another_nodes_write_under_way_in_the_shared_folder(cluster):
    a = cluster.node("node-a")
    images = a.housekeeping.config.images_dir
    folder = images / "job-1"
    folder.mkdir(parents=True)
    # node-b is writing image 0 now, as write_png_atomic does: a temporary name, then rename.
    fd, writing = tempfile.mkstemp(dir=folder, prefix=".0.", suffix=".tmp")
    os.write(fd, b"\x89PNG half of it")
    # node-b died mid-write long ago (it never came back), and less long ago.
    left = folder / ".1.dead01.tmp"
    recent = folder / ".2.dead02.tmp"
    for path, age in ((left, PARTIAL_FILE_AGE + timedelta(minutes=1)),
                      (recent, PARTIAL_FILE_AGE - timedelta(minutes=1))):
        path.write_bytes(b"x")
        moment = time.time() - age.total_seconds()
        os.utime(path, (moment, moment))

    cluster.start_together(a)

    assert cluster.ran()["remove-partial-files"] == 1
    assert not left.exists()
    assert recent.exists()
    # node-b's write ends as it began: its file was there to finish and rename.
    os.write(fd, b" and the rest")
    os.close(fd)
    os.replace(writing, folder / "0.png")
    assert (folder / "0.png").read_bytes() == b"\x89PNG half of it and the rest"
