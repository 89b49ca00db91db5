"""Running `appliance` commands in-process against a config file in a temp folder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from appliance.cli.main import cli, main


def write_cli_config(folder: Path) -> Path:
    """A config file keeping the data in `folder`/state (the `config_file` fixture)."""
    path = folder / "config.toml"
    path.write_text('[storage]\ndata_dir = "state"\ndatabase = "state/app.db"\n')
    return path


def invoke(config_file: Path, *args: str, stdin: str = "") -> Result:
    return CliRunner().invoke(cli, [*args, "--config", str(config_file)], input=stdin)


def run_benchmark(capsys: pytest.CaptureFixture[str], results: Path,
                  *args: str) -> tuple[str, dict[str, Any]]:
    """`appliance ARGS --json RESULTS`, which must succeed: what it printed (shown in the
    test's output too) and the figures it wrote."""
    code = main([*args, "--json", str(results)])
    printed = capsys.readouterr().out
    with capsys.disabled():
        print("\n" + printed)
    assert code == 0
    return printed, json.loads(results.read_text())
