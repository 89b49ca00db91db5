"""The queue shared by the nodes of a cluster, kept in PostgreSQL (cluster mode only).

Queued images are the `job_images` rows with status `queued`. A node claims a
batch of them for itself (`claimed_by`, and a lease: `lease_until`, in the
database's clock) with SELECT ... FOR UPDATE SKIP LOCKED, so that nodes claiming
at the same moment never take the same image, and puts them in its own small
in-memory queue (engine/queue.py), which its workers take from as on one machine.
Its heartbeat renews the leases of the images it holds; once a lease has run out
(the node died, or lost the database), any node may claim the image again, queued
or running. A node records an image's end only while the claim is still its own
(jobs/store.py mark_*), so an image made twice is recorded and charged once.

Order: accounts take turns image by image (each queued image's turn is its rank
among its account's queued images), and a batch holds the images of one
settings, those of the image whose turn comes first: the order of one machine's
queue (engine/queue.py), across the cluster.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Protocol

from appliance.core.clock import utc_clock, utc_iso
from appliance.core.database import ConnectionPool, Database
from appliance.jobs.admission import queue_full
from appliance.jobs.models import GenerationSettings, ImageStatus, QueuedImage

# The channel a submit notifies, so that idle nodes claim at once rather than at their
# next look (they look every POLL_SECONDS as well: a notification can be missed while
# a node reconnects).
CHANNEL = "appliance_queue"
POLL_SECONDS = 1.0
# The database's clock, the one every lease is written and compared in.
NOW = "extract(epoch from clock_timestamp())"

# An image's turn: its rank among its account's images in the same query, oldest job
# first; images are taken in turn order (_IN_TURN), so accounts alternate image by image.
_TURN = ("ROW_NUMBER() OVER (PARTITION BY j.account_id"
         " ORDER BY j.created_at, i.job_id, i.idx) AS turn")
_IN_TURN = "turn, created_at, job_id, idx"

# Claimable: queued or running, and held by no live claim: a running image whose node's
# lease ran out, or one that no node claimed (left running by one appliance before it
# joined a cluster), starts again. Each with its turn (see the module's text).
_CLAIMABLE = f"""
    SELECT i.id, i.job_id, i.idx, j.created_at, j.settings, {_TURN}
    FROM job_images i JOIN jobs j ON j.id = i.job_id
    WHERE i.status IN ('{ImageStatus.QUEUED}', '{ImageStatus.RUNNING}')
      AND (i.claimed_by IS NULL OR i.lease_until < {NOW})
"""

_CANDIDATES = f"""
    WITH claimable AS ({_CLAIMABLE}),
    lead AS (SELECT settings FROM claimable ORDER BY {_IN_TURN} LIMIT 1)
    SELECT c.id FROM claimable c JOIN lead ON lead.settings = c.settings
    ORDER BY {_IN_TURN} LIMIT ?
"""

# Takes what is still claimable of the candidates, skipping rows another node is
# taking at this moment; back to queued (a running image whose node is gone starts
# again), started_at cleared.
_CLAIM = f"""
    UPDATE job_images i SET claimed_by = ?, lease_until = {NOW} + ?,
        status = '{ImageStatus.QUEUED}', started_at = NULL
    FROM jobs j
    WHERE j.id = i.job_id AND i.id IN (
        SELECT id FROM job_images
        WHERE id = ANY(?) AND status IN ('{ImageStatus.QUEUED}', '{ImageStatus.RUNNING}')
          AND (claimed_by IS NULL OR lease_until < {NOW})
        ORDER BY array_position(?, id)
        LIMIT ?
        FOR UPDATE SKIP LOCKED)
    RETURNING i.id, i.job_id, j.account_id, i.idx, i.prompt, i.seed, j.settings
"""


def claim_batch(db: Database, node: str, max_images: int, lease_seconds: float
                ) -> list[QueuedImage]:
    """Up to max_images claimable images of equal settings, claimed for `node`, in turn
    order; [] when none is claimable."""
    # Candidates beyond the batch: some may be claimed by another node meanwhile.
    ids = [row[0] for row in db.execute(_CANDIDATES, [max_images * 2])]
    if not ids:
        return []
    rows = db.execute(_CLAIM, [node, lease_seconds, ids, ids, max_images]).fetchall()
    order = {image_id: n for n, image_id in enumerate(ids)}
    rows.sort(key=lambda row: order[row[0]])
    return [QueuedImage(image_id, job_id, account_id, idx, prompt, seed,
                        GenerationSettings.from_json(settings))
            for image_id, job_id, account_id, idx, prompt, seed, settings in rows]


def renew_leases(db: Database, node: str, lease_seconds: float) -> int:
    """Extends the leases of the images the node holds; returns how many."""
    return db.execute(
        f"UPDATE job_images SET lease_until = {NOW} + ?"
        " WHERE claimed_by = ? AND status IN (?, ?)",
        [lease_seconds, node, ImageStatus.QUEUED, ImageStatus.RUNNING]).rowcount


def release_claims(db: Database, node: str) -> int:
    """At a node's start: what it claimed before is claimable by any node at once (its
    running images start again from their seeds, as on one machine)."""
    return db.execute(
        "UPDATE job_images SET status = ?, started_at = NULL, claimed_by = NULL,"
        " lease_until = NULL WHERE claimed_by = ? AND status IN (?, ?)",
        [ImageStatus.QUEUED, node, ImageStatus.QUEUED, ImageStatus.RUNNING]).rowcount


def depth_by_account(db: Database) -> dict[int, int]:
    """Queued images by account, across the cluster."""
    return dict(db.execute(
        "SELECT j.account_id, COUNT(*) FROM job_images i JOIN jobs j ON j.id = i.job_id"
        " WHERE i.status = ? GROUP BY j.account_id", [ImageStatus.QUEUED]).fetchall())


def queued_images(db: Database) -> int:
    return db.execute("SELECT COUNT(*) FROM job_images WHERE status = ?",
                      [ImageStatus.QUEUED]).fetchone()[0]


def position(db: Database, job_id: str) -> int | None:
    """Queued images the cluster takes before the job's next one; None when none waits."""
    row = db.execute(
        f"""
        WITH queued AS (
            SELECT i.job_id, i.idx, j.created_at, {_TURN}
            FROM job_images i JOIN jobs j ON j.id = i.job_id WHERE i.status = ?),
        mine AS (SELECT * FROM queued WHERE job_id = ? ORDER BY {_IN_TURN} LIMIT 1)
        SELECT (SELECT COUNT(*) FROM queued q
                WHERE (q.turn, q.created_at, q.job_id, q.idx)
                    < (mine.turn, mine.created_at, mine.job_id, mine.idx))
        FROM mine
        """, [ImageStatus.QUEUED, job_id]).fetchone()
    return None if row is None else row[0]


def notify(db: Database) -> None:
    db.execute(f"NOTIFY {CHANNEL}")


@dataclass(frozen=True)
class NodeRow:
    name: str
    address: str
    devices: str
    version: str
    started_at: str
    heartbeat_age_seconds: float
    claimed_images: int
    images_last_minute: int


def heartbeat(db: Database, node: str, address: str, devices: str, version: str,
              started_at: str) -> None:
    db.execute(
        "INSERT INTO nodes (name, address, devices, version, started_at, heartbeat_at)"
        f" VALUES (?, ?, ?, ?, ?, {NOW}) ON CONFLICT (name) DO UPDATE SET"
        " address = excluded.address, devices = excluded.devices, version = excluded.version,"
        " started_at = excluded.started_at, heartbeat_at = excluded.heartbeat_at",
        [node, address, devices, version, started_at])


def nodes(db: Database) -> list[NodeRow]:
    """Every node that has served, newest heartbeat first, with its work."""
    minute_ago = utc_iso(utc_clock() - timedelta(minutes=1))
    rows = db.execute(
        f"""
        SELECT n.name, n.address, n.devices, n.version, n.started_at,
               {NOW} - n.heartbeat_at,
               (SELECT COUNT(*) FROM job_images i
                WHERE i.claimed_by = n.name AND i.status IN (?, ?)),
               (SELECT COUNT(*) FROM job_images i
                WHERE i.made_by = n.name AND i.status = ? AND i.finished_at >= ?)
        FROM nodes n ORDER BY n.heartbeat_at DESC, n.name
        """, [ImageStatus.QUEUED, ImageStatus.RUNNING, ImageStatus.COMPLETED, minute_ago]
    ).fetchall()
    return [NodeRow(*row) for row in rows]


class LocalQueue(Protocol):
    def discard(self, account_id: int, job_id: str) -> int: ...


class SharedQueue:
    """The job service's queue in cluster mode (jobs/service.py JobQueue): room and
    positions from the database; a submit wakes the nodes."""

    def __init__(self, database: ConnectionPool, capacity: int, local: LocalQueue):
        self.database = database
        self.capacity = capacity
        # This node's own queue (engine/queue.py), stocked from the shared one.
        self.local = local

    def reserve(self, count: int) -> None:
        # Called inside the submit's write transaction, which holds the cluster's write
        # lock: no other submit can fill the room between this count and the insert.
        queued = queued_images(self.database.db())
        if queued + count > self.capacity:
            raise queue_full(max(0, self.capacity - queued), self.capacity, count)

    def release(self, count: int) -> None:
        """Nothing was set aside: the count is the database's."""

    def put_reserved(self, images: list[QueuedImage]) -> None:
        notify(self.database.db())

    def discard(self, account_id: int, job_id: str) -> int:
        """Cancelled in the database already: out of this node's own queue too; another
        node that claimed some skips them when its worker comes to them (mark_running)."""
        return self.local.discard(account_id, job_id)

    def position(self, job_id: str) -> int | None:
        return position(self.database.db(), job_id)

