"""`appliance cluster`: the nodes that share one PostgreSQL database, and their queue."""

from __future__ import annotations

import click

from appliance.cli.common import CommandError, CommandGroup, connection_pool, pass_config_file
from appliance.core.config import Config


@click.group("cluster", cls=CommandGroup)
def group() -> None:
    """see the nodes of a cluster (storage.database is a postgresql:// URL)"""


@group.command("status")
@pass_config_file
def status(config: Config) -> None:
    """list the nodes (address, devices, last heartbeat, images made in the last minute,
    images claimed) and the cluster's queue

    A node whose heartbeat is older than cluster.lease_seconds is marked gone: its claimed
    images are made by the others.
    """
    from appliance.jobs import shared_queue

    if not config.cluster_mode:
        raise CommandError(f"this appliance keeps its data in {config.storage.database}, not in a"
                           " cluster's PostgreSQL database (storage.database)")
    database = connection_pool(config)
    try:
        db = database.db()
        nodes = shared_queue.nodes(db)
        queued = shared_queue.queued_images(db)
    finally:
        database.close()
    lease = config.cluster.lease_seconds
    click.echo(f"{'NODE':<20} {'ADDRESS':<22} {'DEVICES':<16} {'HEARTBEAT':<12} {'IMAGES/S':>8}"
               f" {'CLAIMED':>8}")
    for node in nodes:
        beat = (f"{node.heartbeat_age_seconds:.1f} s ago" if node.heartbeat_age_seconds <= lease
                else "gone")
        click.echo(f"{node.name:<20} {node.address:<22} {node.devices:<16} {beat:<12}"
                   f" {node.images_last_minute / 60:>8.2f} {node.claimed_images:>8}")
    alive = sum(node.heartbeat_age_seconds <= lease for node in nodes)
    click.echo(f"{alive} of {len(nodes)} nodes alive; {queued} images queued in the cluster")
