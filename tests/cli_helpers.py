"""Running `appliance` commands in-process against a config file in a temp folder."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner, Result

from appliance.cli.main import cli


def write_cli_config(folder: Path) -> Path:
    """A config file keeping the data in `folder`/state (the `config_file` fixture)."""
    path = folder / "config.toml"
    path.write_text('[storage]\ndata_dir = "state"\ndatabase = "state/app.db"\n')
    return path


def invoke(config_file: Path, *args: str, stdin: str = "") -> Result:
    return CliRunner().invoke(cli, [*args, "--config", str(config_file)], input=stdin)
