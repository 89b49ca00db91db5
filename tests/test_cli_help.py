"""Every command of `appliance` explains itself: its help, each option's, each argument."""

from __future__ import annotations

from collections.abc import Iterator

import click
import pytest

from appliance.cli.main import cli


def _commands(command: click.Command, path: str) -> Iterator[tuple[str, click.Command]]:
    yield path, command
    if isinstance(command, click.Group):
        for name, sub in command.commands.items():
            yield from _commands(sub, f"{path} {name}")


COMMANDS = dict(_commands(cli, "appliance"))


def test_the_tree_is_walked():
    assert {"appliance keys delete", "appliance bench", "appliance models pull"} <= set(COMMANDS)


@pytest.mark.parametrize("path", COMMANDS)
def test_command_options_and_arguments_have_help(path):
    command = COMMANDS[path]
    assert command.help and command.help.strip(), f"{path} has no help"
    for param in command.params:
        if isinstance(param, click.Option):
            assert param.help and param.help.strip(), f"{path} {param.opts[0]} has no help"
        else:
            # click arguments have no help of their own: the command's text names them.
            assert param.human_readable_name in command.help, (
                f"{path}: its help does not describe {param.human_readable_name}")
