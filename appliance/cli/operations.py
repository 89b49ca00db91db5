"""`appliance backup`, `restore` and `doctor`: looking after an installation."""

from __future__ import annotations

import getpass
from pathlib import Path

import click

from appliance.cli.common import CommandError, pass_config_file
from appliance.core.config import Config


def _file_problem(exc: OSError) -> CommandError:
    # Run through the installed `appliance` as root, commands run as the service
    # user: a folder only root may write is the usual cause.
    return CommandError(f"{exc.filename or 'a file'}: {exc.strerror or exc}"
                        f" (running as {getpass.getuser()})")


@click.command("backup")
@click.argument("path", type=click.Path(path_type=Path))
@pass_config_file
def backup(config: Config, path: Path) -> None:
    """copy the database (online, while the service runs), the images and the secret into a
    new folder

    PATH is the folder to create.
    """
    from appliance.ops.backup import create_backup

    try:
        summary = create_backup(config, path)
    except OSError as exc:
        raise _file_problem(exc) from None
    click.echo(f"backed up {summary.rows.get('jobs', 0)} jobs, {summary.rows.get('accounts', 0)}"
               f" accounts and {summary.images} images to {summary.path} (integrity check: ok)")


@click.command("restore")
@click.argument("path", type=click.Path(path_type=Path))
@pass_config_file
def restore(config: Config, path: Path) -> None:
    """replace the data with a backup's; the service must be stopped (the data replaced is
    moved aside, not deleted)

    PATH is a folder made by `appliance backup`.
    """
    from appliance.ops.backup import restore_backup

    try:
        summary = restore_backup(config, path)
    except OSError as exc:
        raise _file_problem(exc) from None
    click.echo(f"restored {summary.rows.get('jobs', 0)} jobs, {summary.rows.get('accounts', 0)}"
               f" accounts and {summary.images} images from {path}")
    if summary.previous:
        click.echo(f"the data it replaced is kept in {summary.previous}; delete it once the"
                   " service works with the restored data")


@click.command("doctor")
@click.option("--load-models", is_flag=True,
              help="also load every installed model on the CPU, one at a time (slow; needs the"
                   " largest model's size in free memory)")
@pass_config_file
def doctor(config: Config, load_models: bool) -> None:
    """check the GPU, driver, models, database and config, and say what is wrong

    The exit status is 1 when a problem is found.
    """
    from appliance.ops.doctor import PROBLEM, diagnose

    findings = diagnose(config, load_models=load_models)
    for finding in findings:
        click.echo(f"{finding.level:<8} {finding.area:<9} {finding.text}")
    problems = sum(finding.level == PROBLEM for finding in findings)
    click.echo(f"{problems} problem(s) found" if problems else "no problems found")
    if problems:
        click.get_current_context().exit(1)
