"""This node's part in a cluster (storage.database is PostgreSQL): it claims images from
the shared queue ahead of its workers, renews its claims' leases, and says it is alive.

Three daemon threads, so that none waits for another's round trip:
- the claimer keeps the node's own queue (engine/queue.py) stocked with up to
  `prefetch` images, claiming a batch whenever there is room and the shared queue
  may hold some (a notification came, the last claim was full, or POLL_SECONDS passed);
- the listener waits for the submits' notifications and wakes the claimer;
- the heartbeat renews the leases of the images the node holds and its row in `nodes`
  every quarter of the lease, whatever the workers are doing.
A database that cannot be reached costs retries, never a thread: each loop logs the
trouble once and goes on; the leases then run out, and other nodes take the images.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from appliance.core.clock import utc_now
from appliance.core.config import Config
from appliance.core.database import ConnectionPool, DatabaseError
from appliance.core.database_url import DatabaseUrl
from appliance.core.postgres import Listener
from appliance.core.version import package_version
from appliance.engine.queue import ImageQueue
from appliance.jobs import shared_queue

log = logging.getLogger(__name__)
T = TypeVar("T")

# How often the claimer looks at its own queue's room (no database involved).
ROOM_CHECK_SECONDS = 0.1


class ClusterCollector(Collector):
    """The cluster's figures for /metrics, read from the database at each scrape: every
    node's heartbeat age, images made in the last minute and images claimed. (This node's
    own engine figures are beside them, labelled as on one machine.)"""

    def __init__(self, database: ConnectionPool):
        self.database = database

    def collect(self) -> Iterator[Metric]:
        try:
            nodes = shared_queue.nodes(self.database.db())
        except DatabaseError:
            return  # /readyz says why; a scrape must not fail for it
        families = {
            "heartbeat": GaugeMetricFamily("appliance_cluster_node_heartbeat_age_seconds",
                                           "Seconds since each node's last heartbeat.",
                                           labels=["node"]),
            "made": GaugeMetricFamily("appliance_cluster_node_images_last_minute",
                                      "Images each node made in the last minute.",
                                      labels=["node"]),
            "claimed": GaugeMetricFamily("appliance_cluster_node_claimed_images",
                                         "Images each node holds: claimed, not yet made.",
                                         labels=["node"]),
        }
        for node in nodes:
            families["heartbeat"].add_metric([node.name], node.heartbeat_age_seconds)
            families["made"].add_metric([node.name], node.images_last_minute)
            families["claimed"].add_metric([node.name], node.claimed_images)
        yield from families.values()


class ClusterMember:
    def __init__(self, config: Config, database: ConnectionPool, queue: ImageQueue,
                 devices: list[str]):
        assert isinstance(config.storage.database, DatabaseUrl), "cluster mode only"
        self.node = config.node_name
        self.database = database
        self.queue = queue
        self.lease_seconds = config.cluster.lease_seconds
        self.batch_size = config.engine.batch_size
        self.prefetch = config.cluster.prefetch_images or 2 * self.batch_size * len(devices)
        self.address = f"{config.server.host}:{config.server.port}"
        self.devices = ",".join(devices)
        self.started_at = utc_now()
        self._listener = Listener(config.storage.database, shared_queue.CHANNEL)
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._failing: set[str] = set()
        self._threads = [threading.Thread(target=self._guarded(target), name=name, daemon=True)
                         for name, target in (("cluster-claimer", self._claim_loop),
                                              ("cluster-listener", self._listen_loop),
                                              ("cluster-heartbeat", self._heartbeat_loop))]

    def start(self) -> None:
        """Takes back for the cluster what this node held before it stopped, then joins."""
        released = shared_queue.release_claims(self.database.db(), self.node)
        if released:
            log.info("released %d images this node held when it last stopped; any node may"
                     " make them now", released)
        self.beat()
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()
        # The listener is not waited for: it ends (and closes its connection) at the end of
        # its current wait, within POLL_SECONDS, and claims nothing.
        for thread in self._threads:
            if thread.name != "cluster-listener":
                thread.join(5.0)

    def depth_by_account(self) -> dict[int, int] | None:
        """The cluster's queued images by account; None when the database cannot say."""
        try:
            return shared_queue.depth_by_account(self.database.db())
        except DatabaseError:
            return None

    def leave(self) -> None:
        """After the workers stopped: what the node still holds, any node may make now,
        rather than after the leases run out."""
        released = self._attempt("release this node's images",
                                 lambda: shared_queue.release_claims(self.database.db(),
                                                                     self.node))
        if released:
            log.info("released %d images this node held; other nodes make them", released)

    def beat(self) -> None:
        db = self.database.db()
        shared_queue.heartbeat(db, self.node, self.address, self.devices, package_version(),
                               self.started_at)
        shared_queue.renew_leases(db, self.node, self.lease_seconds)

    def claim(self) -> int:
        """Claims one batch if there is room; returns how many images it claimed."""
        room = self.prefetch - len(self.queue)
        if room <= 0:
            return 0
        images = shared_queue.claim_batch(self.database.db(), self.node,
                                          min(room, self.batch_size), self.lease_seconds)
        # Past the queue's capacity if need be: they are paid for and this node's now.
        self.queue.put_recovered(images)
        return len(images)

    def _claim_loop(self) -> None:
        last_look = float("-inf")
        more = True
        while not self._stopping.is_set():
            due = (self._wake.is_set() or more
                   or time.monotonic() - last_look >= shared_queue.POLL_SECONDS)
            if due and len(self.queue) < self.prefetch:
                self._wake.clear()
                last_look = time.monotonic()
                claimed = self._attempt("claim images", self.claim) or 0
                # A full batch: the shared queue may hold more; look again at once.
                more = claimed >= self.batch_size
                if more:
                    continue
            self._wake.wait(ROOM_CHECK_SECONDS)

    def _listen_loop(self) -> None:
        try:
            while not self._stopping.is_set():
                if self._listener.wait(shared_queue.POLL_SECONDS):
                    self._wake.set()
        finally:
            self._listener.close()

    def _heartbeat_loop(self) -> None:
        while not self._stopping.wait(self.lease_seconds / 4):
            self._attempt("renew this node's claims", self.beat)

    def _attempt(self, doing: str, action: Callable[[], T]) -> T | None:
        """The action's result; None when the database failed it (logged once a streak,
        then a pause, so that a database that is down is not hammered)."""
        try:
            result = action()
        except DatabaseError as exc:
            if doing not in self._failing:
                log.warning("could not %s (trying again): %s", doing, exc)
            self._failing.add(doing)
            self._stopping.wait(1.0)
            return None
        if doing in self._failing:
            self._failing.discard(doing)
            log.info("the database answers again: could %s", doing)
        return result

    def _guarded(self, target: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                target()
            except Exception:  # a thread that dies silently would stop the node
                log.exception("the cluster thread %s stopped", threading.current_thread().name)
        return run
