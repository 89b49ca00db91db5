"""`appliance keys`: the API keys an account's programs authenticate with."""

from __future__ import annotations

import click

from appliance.accounts.audit import Actor
from appliance.cli.common import CommandGroup, account_services, pass_config_file
from appliance.core.config import Config


@click.group("keys", cls=CommandGroup)
def group() -> None:
    """manage API keys"""


@group.command("create")
@click.argument("email")
@click.option("--name", required=True, help="a descriptive name, e.g. Production")
@pass_config_file
def create(config: Config, email: str, name: str) -> None:
    """create an API key; prints it once, as the last line

    EMAIL is the address of the account the key acts for.
    """
    accounts, keys = account_services(config)
    account = accounts.find(email)
    info, raw = keys.create(account.id, name, Actor.cli())
    click.echo(f"created key {info.name!r} ({info.prefix}) for {account.email}.", err=True)
    click.echo("Copy it now: it is shown only this once.", err=True)
    click.echo(raw)


@group.command("list")
@click.argument("email")
@pass_config_file
def list_keys(config: Config, email: str) -> None:
    """list an account's live keys

    EMAIL is the account's address.
    """
    accounts, keys = account_services(config)
    account = accounts.find(email)
    rows = [("NAME", "PREFIX", "LAST USED", "CREATED")] + [
        (k.name, k.prefix, k.last_used_at or "never", k.created_at)
        for k in keys.live(account.id)
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    for row in rows:
        cells = (cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        click.echo("  ".join(cells).rstrip())


@group.command("delete")
@click.argument("email")
@click.argument("prefix")
@click.option("--name", help="the key's name, where two keys share a prefix")
@pass_config_file
def delete(config: Config, email: str, prefix: str, name: str | None) -> None:
    """revoke a key, at once and for good

    EMAIL is the account's address; PREFIX, the key's first 12 characters, as listed.
    """
    accounts, keys = account_services(config)
    account = accounts.find(email)
    key = keys.delete(account.id, prefix, Actor.cli(), name=name)
    click.echo(f"deleted key {key.name!r} ({key.prefix}) of {account.email};"
               " it is refused from now on")
