"""`appliance credits`: what accounts may spend on images."""

from __future__ import annotations

import click

from appliance.accounts.audit import Actor
from appliance.cli.common import WHOLE_NUMBER, CommandGroup, account_services, pass_config
from appliance.core.config import Config


@click.group("credits", cls=CommandGroup)
def group() -> None:
    """manage credits"""


# ignore_unknown_options: click would take a negative AMOUNT ("-5") for an unknown option.
@group.command("grant", context_settings={"ignore_unknown_options": True})
@click.argument("email")
@click.argument("amount", type=WHOLE_NUMBER)
@click.option("--reason", default="grant", help="why, for the ledger")
@pass_config
def grant(config: Config, email: str, amount: int, reason: str) -> None:
    """add credits to an account (a negative number removes them)

    EMAIL is the account's address, AMOUNT the number of credits.
    """
    accounts, _ = account_services(config)
    balance = accounts.grant_credits(email, amount, Actor.cli(), reason=reason)
    click.echo(f"{email.strip().lower()} now has {balance} credits")
