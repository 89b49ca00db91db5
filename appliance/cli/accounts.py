"""`appliance accounts`: the accounts that log in to the console and own the API keys."""

from __future__ import annotations

import sys

import click

from appliance.accounts.audit import Actor
from appliance.cli.common import (
    WHOLE_NUMBER,
    CommandError,
    CommandGroup,
    account_services,
    pass_config,
)
from appliance.core.config import Config


@click.group("accounts", cls=CommandGroup)
def group() -> None:
    """manage accounts"""


def _read_password(from_stdin: bool) -> str:
    if from_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
        if not password:
            raise CommandError("no password on standard input")
        return password
    if not sys.stdin.isatty():
        raise CommandError("no terminal to ask for the password: use --password-stdin")
    return click.prompt("Password", hide_input=True, confirmation_prompt=True)


@group.command("create")
@click.argument("email")
@click.option("--admin", is_flag=True, help="make the account an admin")
@click.option("--credits", type=WHOLE_NUMBER, default=0, metavar="N", help="initial credits")
@click.option("--password-stdin", is_flag=True,
              help="read the password from the first line of standard input")
@pass_config
def create(config: Config, email: str, admin: bool, credits: int, password_stdin: bool) -> None:
    """create an account

    EMAIL is the address the account logs in to the console with. Without
    --password-stdin, the password is asked for on the terminal, twice.
    """
    if credits < 0:
        raise CommandError("--credits cannot be negative")
    password = _read_password(password_stdin)
    account_service, _ = account_services(config)
    account = account_service.create(email, password, Actor.cli(), is_admin=admin,
                                     credits=credits)
    role = "admin" if account.is_admin else "user"
    click.echo(f"created {role} account {account.email} with {account.credits} credits")
