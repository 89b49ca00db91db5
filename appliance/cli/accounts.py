"""`appliance accounts`: the accounts that log in to the console and own the API keys."""

from __future__ import annotations

import sys

import click

from appliance.accounts.accounts import MAX_CREDITS
from appliance.accounts.audit import Actor
from appliance.accounts.service import SignInService
from appliance.accounts.signin import SignInLimits
from appliance.cli.common import (
    CommandError,
    CommandGroup,
    WholeNumber,
    account_services,
    connection_pool,
    pass_config_file,
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
@click.option("--credits", type=WholeNumber(0, MAX_CREDITS), default=0, metavar="N",
              help="initial credits")
@click.option("--password-stdin", is_flag=True,
              help="read the password from the first line of standard input")
@pass_config_file
def create(config: Config, email: str, admin: bool, credits: int, password_stdin: bool) -> None:
    """create an account

    EMAIL is the address the account logs in to the console with. Without
    --password-stdin, the password is asked for on the terminal, twice.
    """
    password = _read_password(password_stdin)
    account_service, _ = account_services(config)
    account = account_service.create(email, password, Actor.cli(), is_admin=admin,
                                     credits=credits)
    role = "admin" if account.is_admin else "user"
    click.echo(f"created {role} account {account.email} with {account.credits} credits")


@group.command("unlock")
@click.argument("email")
@pass_config_file
def unlock(config: Config, email: str) -> None:
    """let an account sign in to the console at once again

    EMAIL is the account's address. Its failed sign-ins, from every address,
    stop counting: the waits they imposed end now.
    """
    account_service, _ = account_services(config)
    account = account_service.find(email)
    signin = SignInService(connection_pool(config), SignInLimits.from_config(config.console))
    forgotten = signin.unlock(account.id, Actor.cli())
    click.echo(f"unlocked sign-in for {account.email}: {forgotten} failed"
               f" sign-in{'s' * (forgotten != 1)} forgotten")
