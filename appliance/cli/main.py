"""The `appliance` command: the click group and the console script's entry point."""

from __future__ import annotations

from collections.abc import Sequence

import click

from appliance.cli import (
    accounts,
    bench,
    cluster,
    credits,
    generate,
    keys,
    models,
    operations,
    serving,
)
from appliance.cli.common import CommandGroup, config_option


@click.group("appliance", cls=CommandGroup, metavar="COMMAND")
@config_option
def cli() -> None:
    """AI Media Maker: bulk image generation."""


for command in (serving.init, serving.serve, accounts.group, credits.group, keys.group,
                models.group, generate.generate, operations.backup, operations.restore,
                operations.doctor, cluster.group, bench.bench, bench.bench_api,
                bench.bench_cluster, bench.bench_models):
    cli.add_command(command)


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line (default: sys.argv) and returns its exit status."""
    try:
        cli.main(args=argv, prog_name="appliance")
    except SystemExit as stopped:
        # Standalone, click always ends with sys.exit and a whole-number status.
        return int(stopped.code or 0)
