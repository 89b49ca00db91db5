"""What the `appliance` commands share: --config, errors as one line, whole numbers."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, Concatenate, ParamSpec

import click

from appliance.accounts.service import AccountService, KeyService
from appliance.core.config import CONFIG_ENV, Config, ConfigError, load_config
from appliance.core.database import ConnectionPool, DatabaseError, problem_sentence
from appliance.core.errors import ApplianceError
from appliance.core.numbers import LARGEST_INTEGER, whole_number
from appliance.runtime.logs import configure_logging

P = ParamSpec("P")

_CONFIG_FILE = "appliance.config_file"


class CommandError(click.ClickException):
    """A problem worded for the operator; printed as one line, exit status 1."""

    def show(self, file: IO[Any] | None = None) -> None:
        click.echo(f"appliance: {self.format_message()}", file=file, err=True)


class OneLineUsageError(click.UsageError):
    """A usage error as one line naming the command, so that scripts log something readable."""

    def show(self, file: IO[Any] | None = None) -> None:
        path = self.ctx.command_path if self.ctx else "appliance"
        click.echo(f"{path}: {self.format_message()} (see {path} --help)", file=file, err=True)


def _param_name(param: click.Parameter) -> str:
    return "/".join(param.opts) if isinstance(param, click.Option) else param.human_readable_name


def _one_line(error: click.UsageError) -> OneLineUsageError:
    if isinstance(error, OneLineUsageError):
        return error
    # click ends its messages with a full stop; here the line goes on with "(see ...)".
    message = error.format_message().rstrip(".")
    if isinstance(error, click.MissingParameter) and error.param is not None:
        message = f"the following arguments are required: {_param_name(error.param)}"
    elif isinstance(error, click.BadParameter) and error.param is not None:
        message = f"argument {_param_name(error.param)}: {error.message.rstrip('.')}"
    elif isinstance(error, click.NoSuchOption):
        message = f"unrecognized arguments: {error.option_name}"
    return OneLineUsageError(message, error.ctx)


class CommandGroup(click.Group):
    """Commands listed in the order they were added; every usage error below it as one line.

    `metavar` names the command in errors, as an argument would be: "the following
    arguments are required: ACTION", "argument ACTION: invalid choice: ...".
    """

    def __init__(self, *, metavar: str = "ACTION", **kwargs: Any) -> None:
        # invoke_without_command: a missing command reaches the end of invoke(), to be
        # reported as a missing argument (click's own "Missing command." has no hook).
        super().__init__(invoke_without_command=True, subcommand_metavar=f"{metavar} ...",
                         **kwargs)
        self.metavar = metavar

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(self.commands)

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)
        except click.UsageError as error:
            raise _one_line(error) from None

    def resolve_command(
        self, ctx: click.Context, args: list[str]
    ) -> tuple[str | None, click.Command | None, list[str]]:
        if self.get_command(ctx, args[0]) is None:
            choices = ", ".join(map(repr, self.commands))
            raise OneLineUsageError(f"argument {self.metavar}: invalid choice: {args[0]!r}"
                                    f" (choose from {choices})", ctx)
        return super().resolve_command(ctx, args)

    def invoke(self, ctx: click.Context) -> Any:
        # A subcommand's usage errors come up through here: its parsing happens inside.
        try:
            result = super().invoke(ctx)
        except click.UsageError as error:
            raise _one_line(error) from None
        if ctx.invoked_subcommand is None:
            raise OneLineUsageError(f"the following arguments are required: {self.metavar}", ctx)
        return result


class WholeNumber(click.ParamType):
    """A number in the digits 0-9, with '-' before a negative one ("12", "-5"; not " 7",
    "+7", "1_000" or "٣"), from `low` to `high`."""

    name = "integer"

    def __init__(self, low: int = -LARGEST_INTEGER - 1, high: int = LARGEST_INTEGER):
        self.low, self.high = low, high

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            # A default written in the code, or a value click already converted.
            return value
        try:
            return whole_number(value, self.low, self.high)
        except ValueError as problem:
            self.fail(str(problem), param, ctx)


# Counts, sizes and ports: what the command then checks against its own bounds.
WHOLE_NUMBER = WholeNumber(0, LARGEST_INTEGER)


def _remember_config_file(ctx: click.Context, param: click.Parameter, value: Path | None) -> None:
    # ctx.meta is shared by the whole command line, and the command's own --config is
    # parsed after the one before it, so the command's wins.
    if value is not None:
        ctx.meta[_CONFIG_FILE] = value


config_option = click.option(
    "--config", type=click.Path(path_type=Path), metavar="FILE", expose_value=False,
    callback=_remember_config_file,
    help="config file (default: $APPLIANCE_CONFIG, else ./config.toml, else the checkout's"
         " own when run from one)")


# Said by a command that works on an installation's data when no config file names one:
# the defaults would make an empty database in whatever folder it was run from.
NO_CONFIG_FILE = ("no config file, so no database to use: pass --config FILE, set"
                  f" {CONFIG_ENV}, or run it in the folder holding config.toml")


def pass_config(command: Callable[Concatenate[Config, P], None]) -> Callable[P, None]:
    """Gives a command --config and calls it with the config loaded and logging set up.

    Put it right above the function. ConfigError and ApplianceError become one line
    and exit status 1, and so does a database the command cannot use (damaged, not a
    database, unreadable, locked), worded with what to do; Ctrl-C, exit status 130.
    Without a config file the command runs on the defaults.
    """
    return _with_config(command, needs_file=False)


def pass_config_file(command: Callable[Concatenate[Config, P], None]) -> Callable[P, None]:
    """pass_config for a command that works on an existing installation's data: without a
    config file it says so in one line (NO_CONFIG_FILE) and makes nothing."""
    return _with_config(command, needs_file=True)


def _with_config(command: Callable[Concatenate[Config, P], None], *,
                 needs_file: bool) -> Callable[P, None]:
    @config_option
    @functools.wraps(command)
    def run(*args: P.args, **kwargs: P.kwargs) -> None:
        ctx = click.get_current_context()
        logging.basicConfig(level=logging.INFO,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        try:
            config = load_config(ctx.meta.get(_CONFIG_FILE))
            if needs_file and config.source is None:
                raise CommandError(NO_CONFIG_FILE)
            configure_logging(config.logging)
            command(config, *args, **kwargs)
        except (ConfigError, ApplianceError) as exc:
            raise CommandError(str(exc)) from None
        except DatabaseError as exc:
            # The commands' database is the config's (a backup's own is checked before use).
            raise CommandError(problem_sentence(config.storage.database, exc)) from None
        except (KeyboardInterrupt, click.Abort):
            ctx.exit(130)

    return run


def connection_pool(config: Config) -> ConnectionPool:
    return ConnectionPool(config.storage.database, config.storage.busy_timeout_seconds)


def account_services(config: Config) -> tuple[AccountService, KeyService]:
    """The services the account and key commands call, on one connection."""
    database = connection_pool(config)
    return AccountService(database), KeyService(database)
