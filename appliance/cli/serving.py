"""`appliance init` and `appliance serve`: the service itself."""

from __future__ import annotations

import logging

import click

from appliance.cli.common import WholeNumber, pass_config
from appliance.core.config import Bounds, Config, declared

log = logging.getLogger("appliance")


def _port_type() -> WholeNumber:
    """The port as server.port bounds it."""
    bounds = declared("server.port").check
    assert isinstance(bounds, Bounds)
    return WholeNumber(int(bounds.low), int(bounds.high))


@click.command("init")
@pass_config
def init(config: Config) -> None:
    """create the data folder, database and secrets (safe to repeat)"""
    from appliance.ops.initialise import initialise

    for line in initialise(config):
        click.echo(line)


@click.command("serve")
@click.option("--host", help="address to listen on (default: server.host)")
@click.option("--port", type=_port_type(), help="port to listen on (default: server.port)")
@pass_config
def serve(config: Config, host: str | None, port: int | None) -> None:
    """run the HTTP API and the engine"""
    from appliance.ops.initialise import initialise
    from appliance.runtime.serve import run_service

    for line in initialise(config):
        log.info("%s", line)
    code = run_service(config, host or config.server.host, port or config.server.port)
    click.get_current_context().exit(code)
