"""`appliance credits`: what accounts may spend on images."""

from __future__ import annotations

import click

from appliance.accounts.accounts import MAX_CREDITS
from appliance.accounts.audit import Actor
from appliance.cli.common import CommandGroup, WholeNumber, account_services, pass_config_file
from appliance.core.config import Config


@click.group("credits", cls=CommandGroup)
def group() -> None:
    """manage credits"""


# ignore_unknown_options: click would take a negative AMOUNT ("-5") for an unknown option.
@group.command("grant", context_settings={"ignore_unknown_options": True})
@click.argument("email")
@click.argument("amount", type=WholeNumber(-MAX_CREDITS, MAX_CREDITS))
@click.option("--reason", default="grant", help="why, for the ledger")
@pass_config_file
def grant(config: Config, email: str, amount: int, reason: str) -> None:
    """add credits to an account (a negative number removes them)

    EMAIL is the account's address, AMOUNT the number of credits. A grant that would
    take the balance past the most an account may hold is refused.
    """
    accounts, _ = account_services(config)
    balance = accounts.grant_credits(email, amount, Actor.cli(), reason=reason)
    click.echo(f"{email.strip().lower()} now has {balance} credits")
