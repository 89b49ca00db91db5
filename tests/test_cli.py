"""The `appliance` command against a real database file: in-process through click's
CliRunner, and as the real process where the process itself is what is tested."""

from __future__ import annotations

import os
import pty
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from appliance.cli.main import cli
from appliance.core.database import open_database

from .cli_helpers import invoke
from .helpers import database_text

# The command points the root logger at CliRunner's stderr, which closes after it.
pytestmark = pytest.mark.usefixtures("root_handlers_restored")




def run(config_file: Path, *args: str, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "appliance", *args, "--config", str(config_file)],
        input=stdin, capture_output=True, text=True, timeout=120,
    )


def test_init_is_idempotent(config_file, tmp_path):
    first = invoke(config_file, "init")
    assert first.exit_code == 0, first.stderr
    assert "created database" in first.stdout
    secret = tmp_path / "state" / "secret_key"
    assert secret.stat().st_mode & 0o777 == 0o600
    value = secret.read_text()
    second = invoke(config_file, "init")
    assert second.exit_code == 0 and second.stdout == ""
    assert secret.read_text() == value


def test_account_key_lifecycle(config_file, tmp_path):
    made = invoke(config_file, "accounts", "create", "dev@example.com", "--credits", "6",
                  "--password-stdin", stdin="correct horse battery\n")
    assert made.exit_code == 0, made.stderr
    assert made.stdout == "created user account dev@example.com with 6 credits\n"

    created = invoke(config_file, "keys", "create", "dev@example.com", "--name", "Production")
    assert created.exit_code == 0, created.stderr
    key = created.stdout.splitlines()[-1]
    assert re.fullmatch(r"wi_live_[0-9a-f]{64}", key)
    assert key not in created.stderr
    assert created.stderr == (f"created key 'Production' ({key[:12]}) for dev@example.com.\n"
                              "Copy it now: it is shown only this once.\n")

    listed = invoke(config_file, "keys", "list", "dev@example.com")
    assert listed.exit_code == 0
    assert listed.stdout.splitlines()[0].split() == ["NAME", "PREFIX", "LAST", "USED", "CREATED"]
    assert "Production" in listed.stdout and key[:12] in listed.stdout
    assert key[12:] not in listed.stdout and "never" in listed.stdout

    granted = invoke(config_file, "credits", "grant", "dev@example.com", "4")
    assert granted.exit_code == 0 and granted.stdout == "dev@example.com now has 10 credits\n"
    removed = invoke(config_file, "credits", "grant", "dev@example.com", "-3", "--reason", "refund")
    assert removed.exit_code == 0 and "now has 7 credits" in removed.stdout

    deleted = invoke(config_file, "keys", "delete", "dev@example.com", key[:12])
    assert deleted.exit_code == 0, deleted.stderr
    assert "Production" not in invoke(config_file, "keys", "list", "dev@example.com").stdout

    db = open_database(tmp_path / "state" / "app.db")
    actions = [r["action"] for r in db.query("SELECT action FROM audit_log ORDER BY id")]
    assert actions == ["account.create", "key.create", "credits.grant", "credits.grant",
                       "key.delete"]
    assert key not in database_text(db)


def test_config_is_taken_before_the_command_or_on_it(config_file, tmp_path):
    elsewhere = tmp_path / "elsewhere.toml"
    elsewhere.write_text('[storage]\ndata_dir = "other"\ndatabase = "other/app.db"\n')
    before = CliRunner().invoke(cli, ["--config", str(config_file), "init"])
    assert before.exit_code == 0 and (tmp_path / "state" / "app.db").exists()
    # On the command, it wins over the one before it.
    both = CliRunner().invoke(cli, ["--config", str(config_file), "init",
                                    "--config", str(elsewhere)])
    assert both.exit_code == 0 and (tmp_path / "other" / "app.db").exists()


@pytest.mark.parametrize(
    ("args", "stdin", "code", "message"),
    [
        (("keys", "create", "nobody@example.com", "--name", "x"), "", 1,
         "appliance: no account for nobody@example.com"),
        (("keys", "create", "dev@example.com"), "", 2,
         "appliance keys create: the following arguments are required: --name"
         " (see appliance keys create --help)"),
        (("credits", "grant", "dev@example.com", "many"), "", 2,
         "appliance credits grant: argument AMOUNT: 'many' is not a whole number"
         " (see appliance credits grant --help)"),
        (("credits", "grant", "dev@example.com"), "", 2,
         "the following arguments are required: AMOUNT"),
        (("credits", "grant", "dev@example.com", "-5"), "", 1, "cannot remove 5 credits"),
        (("accounts", "create", "dev@example.com", "--password-stdin"), "", 1,
         "appliance: no password on standard input"),
        (("accounts", "create", "dev@example.com"), "", 1,
         "appliance: no terminal to ask for the password: use --password-stdin"),
        (("accounts", "create", "x@example.com", "--credits", "-1", "--password-stdin"),
         "long enough\n", 2,
         "argument --credits: '-1' is out of range: it must be from 0 to 1000000000000"),
        (("accounts", "create", "x@example.com", "--credits", "1.5"), "", 2,
         "argument --credits: '1.5' is not a whole number"),
        (("accounts", "create", "not-an-email", "--password-stdin"), "long enough\n", 1,
         "is not an email address"),
        (("keys", "delete", "dev@example.com", "wi_live_0000"), "", 1,
         "no live key with prefix wi_live_0000"),
        (("keys", "list", "dev@example.com", "--bogus"), "", 2,
         "appliance keys list: unrecognized arguments: --bogus"),
        (("keys", "frob"), "", 2,
         "appliance keys: argument ACTION: invalid choice: 'frob'"
         " (choose from 'create', 'list', 'delete') (see appliance keys --help)"),
        (("frobnicate",), "", 2, "invalid choice: 'frobnicate'"),
        (("models", "synth", "somewhere", "--size", "huge"), "", 2,
         "argument --size: 'huge' is not one of 'tiny', 'sd15', 'tiny-sdxl' (see"),
        (("serve", "--port", "eighty"), "", 2, "argument --port: 'eighty' is not a whole number"),
    ],
)
def test_bad_arguments_give_one_line_and_a_non_zero_exit(config_file, args, stdin, code,
                                                          message):
    invoke(config_file, "accounts", "create", "dev@example.com", "--password-stdin",
           stdin="correct horse battery\n")
    result = invoke(config_file, *args, stdin=stdin)
    assert result.exit_code == code, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((), "appliance: the following arguments are required: COMMAND (see appliance --help)"),
        (("keys",), "appliance keys: the following arguments are required: ACTION"
                    " (see appliance keys --help)"),
    ],
)
def test_a_missing_command_is_named_like_an_argument(config_file, args, message):
    result = CliRunner().invoke(cli, ["--config", str(config_file), *args])
    assert (result.exit_code, result.stdout, result.stderr) == (2, "", message + "\n")


def test_whole_numbers_are_ascii_digits_with_an_optional_minus(config_file):
    invoke(config_file, "accounts", "create", "dev@example.com", "--password-stdin",
           stdin="correct horse battery\n")
    for amount, balance in (("7", 7), ("007", 14), ("-4", 10)):
        granted = invoke(config_file, "credits", "grant", "dev@example.com", amount)
        assert granted.stdout == f"dev@example.com now has {balance} credits\n", granted.output
    # What int() would also take, each refused with one line and nothing granted.
    for amount in (" 7", "1_000", "+3", "\u0663", "\uff13"):
        refused = invoke(config_file, "credits", "grant", "dev@example.com", amount)
        assert refused.exit_code == 2 and "is not a whole number" in refused.stderr, amount
    assert invoke(config_file, "credits", "grant", "dev@example.com", "1").stdout == (
        "dev@example.com now has 11 credits\n")


def test_bad_config_stops_with_one_line(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[server]\nport = 'eighty'\n")
    result = invoke(path, "init")
    assert result.exit_code == 1
    assert result.stderr == (
        f"appliance: {path}: server.port must be an integer, got a string ('eighty')\n")


def test_ctrl_c_exits_130_quietly(config_file, monkeypatch):
    def interrupted(config):
        raise KeyboardInterrupt

    monkeypatch.setattr("appliance.ops.initialise.initialise", interrupted)
    result = invoke(config_file, "init")
    assert (result.exit_code, result.output) == (130, "")


@pytest.mark.system
def test_the_real_command_exits_with_its_status_and_one_line(config_file):
    made = run(config_file, "accounts", "create", "dev@example.com", "--password-stdin",
               stdin="correct horse battery\n")
    assert (made.returncode, made.stderr) == (0, ""), made.stderr
    assert made.stdout == "created user account dev@example.com with 0 credits\n"

    unknown = run(config_file, "frobnicate")
    assert (unknown.returncode, unknown.stdout) == (2, "")
    assert unknown.stderr == (
        "appliance: argument COMMAND: invalid choice: 'frobnicate' (choose from 'init', 'serve',"
        " 'accounts', 'credits', 'keys', 'models', 'generate', 'backup', 'restore', 'doctor',"
        " 'cluster', 'bench', 'bench-api', 'bench-cluster', 'bench-models') (see appliance"
        " --help)\n")

    refused = run(config_file, "keys", "create", "nobody@example.com", "--name", "x")
    assert (refused.returncode, refused.stdout) == (1, "")
    assert refused.stderr == "appliance: no account for nobody@example.com\n"


def _read_until(fd: int, wanted: bytes, seen: bytearray) -> None:
    deadline = time.monotonic() + 60
    while wanted not in seen:
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        try:
            chunk = os.read(fd, 1024) if ready else b""
        except OSError:  # the command ended, closing the terminal
            chunk = b""
        assert chunk, f"no {wanted!r} from the command; it wrote {bytes(seen)!r}"
        seen += chunk


@pytest.mark.system
def test_the_password_is_asked_for_twice_on_a_terminal_without_echo(config_file):
    password = "a terminal password"
    # pty.fork, not subprocess: the command must have the terminal as its controlling one.
    pid, terminal = pty.fork()
    if pid == 0:
        try:
            os.execv(sys.executable, [sys.executable, "-m", "appliance", "accounts", "create",
                                      "tty@example.com", "--config", str(config_file)])
        finally:
            os._exit(127)
    seen = bytearray()
    try:
        _read_until(terminal, b"Password: ", seen)
        os.write(terminal, password.encode() + b"\n")
        _read_until(terminal, b"Repeat for confirmation: ", seen)
        os.write(terminal, password.encode() + b"\n")
        _read_until(terminal, b"credits", seen)
    except BaseException:
        os.kill(pid, signal.SIGKILL)
        raise
    finally:
        _, status = os.waitpid(pid, 0)
        os.close(terminal)
    assert os.waitstatus_to_exitcode(status) == 0, bytes(seen)
    assert b"created user account tty@example.com with 0 credits" in seen
    assert password.encode() not in seen
