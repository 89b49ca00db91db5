"""The `appliance` command, run as a real process against a real database file."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from appliance.core.database import open_database


@pytest.fixture
def config_file(tmp_path) -> Path:
    path = tmp_path / "config.toml"
    path.write_text('[storage]\ndata_dir = "state"\ndatabase = "state/app.db"\n')
    return path


def run(config_file: Path, *args: str, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "appliance", *args, "--config", str(config_file)],
        input=stdin, capture_output=True, text=True, timeout=120,
    )


def test_init_is_idempotent(config_file, tmp_path):
    first = run(config_file, "init")
    assert first.returncode == 0, first.stderr
    assert "created database" in first.stdout
    secret = tmp_path / "state" / "secret_key"
    assert secret.stat().st_mode & 0o777 == 0o600
    value = secret.read_text()
    second = run(config_file, "init")
    assert second.returncode == 0 and second.stdout == ""
    assert secret.read_text() == value


def test_account_key_lifecycle(config_file, tmp_path):
    made = run(config_file, "accounts", "create", "dev@example.com", "--credits", "6",
               "--password-stdin", stdin="correct horse battery\n")
    assert made.returncode == 0, made.stderr
    assert "6 credits" in made.stdout

    created = run(config_file, "keys", "create", "dev@example.com", "--name", "Production")
    assert created.returncode == 0, created.stderr
    key = created.stdout.splitlines()[-1]
    assert re.fullmatch(r"wi_live_[0-9a-f]{64}", key)
    assert key not in created.stderr

    listed = run(config_file, "keys", "list", "dev@example.com")
    assert listed.returncode == 0
    assert "Production" in listed.stdout and key[:12] in listed.stdout
    assert key[12:] not in listed.stdout and "never" in listed.stdout

    granted = run(config_file, "credits", "grant", "dev@example.com", "4")
    assert granted.returncode == 0 and "now has 10 credits" in granted.stdout

    deleted = run(config_file, "keys", "delete", "dev@example.com", key[:12])
    assert deleted.returncode == 0, deleted.stderr
    assert "Production" not in run(config_file, "keys", "list", "dev@example.com").stdout

    db = open_database(tmp_path / "state" / "app.db")
    actions = [r["action"] for r in db.query("SELECT action FROM audit_log ORDER BY id")]
    assert actions == ["account.create", "key.create", "credits.grant", "key.delete"]
    assert key not in "\n".join(db.conn.iterdump())


@pytest.mark.parametrize(
    ("args", "stdin", "message"),
    [
        (("keys", "create", "nobody@example.com", "--name", "x"), "", "no account for nobody@example.com"),
        (("keys", "create", "dev@example.com"), "", "the following arguments are required: --name"),
        (("credits", "grant", "dev@example.com", "many"), "", "'many' is not a whole number"),
        (("credits", "grant", "dev@example.com", "-5"), "", "cannot remove 5 credits"),
        (("accounts", "create", "dev@example.com", "--password-stdin"), "", "no password on standard input"),
        (("accounts", "create", "not-an-email", "--password-stdin"), "long enough\n", "is not an email address"),
        (("keys", "delete", "dev@example.com", "wi_live_0000"), "", "no live key with prefix wi_live_0000"),
        (("frobnicate",), "", "invalid choice: 'frobnicate'"),
    ],
)
def test_bad_arguments_give_one_line_and_a_non_zero_exit(config_file, args, stdin, message):
    run(config_file, "accounts", "create", "dev@example.com", "--password-stdin",
        stdin="correct horse battery\n")
    result = run(config_file, *args, stdin=stdin)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], result.stderr


def test_bad_config_stops_with_one_line(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[server]\nport = 'eighty'\n")
    result = run(path, "init")
    assert result.returncode == 1
    assert result.stderr.strip() == (
        f"appliance: {path}: server.port must be an integer, got a string ('eighty')")
