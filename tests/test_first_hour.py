"""What a newcomer meets in the first hour: the command run from any folder, a start-up
without notices they cannot act on, and a refusal for want of credits that says what to do."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner

import appliance.core.config as config_module
from appliance.accounts import accounts, audit
from appliance.cli.common import NO_CONFIG_FILE
from appliance.cli.main import cli
from appliance.core.database import ConnectionPool

from .console_helpers import PASSWORD, post_form, sign_in

ROOT = Path(__file__).resolve().parent.parent

# The commands that work on an installation's data, with arguments that would make an
# empty database (or a backup of one) where they run if they ran on the defaults.
DATABASE_COMMANDS = [
    ["accounts", "create", "x@example.com"],
    ["accounts", "unlock", "x@example.com"],
    ["keys", "create", "x@example.com", "--name", "Laptop"],
    ["keys", "list", "x@example.com"],
    ["keys", "delete", "x@example.com", "wi_live_0123"],
    ["credits", "grant", "x@example.com", "5"],
    ["backup", "copy"],
    ["restore", "copy"],
    ["doctor"],
]


@pytest.fixture
def outside(tmp_path, monkeypatch) -> Path:
    """A folder with no config.toml, the code an installed copy rather than a checkout's, and
    no $APPLIANCE_CONFIG: where a newcomer runs the command by its full path."""
    folder = tmp_path / "elsewhere"
    folder.mkdir()
    monkeypatch.chdir(folder)
    monkeypatch.delenv("APPLIANCE_CONFIG", raising=False)
    monkeypatch.setattr(config_module, "CHECKOUT", tmp_path / "site-packages")
    return folder


def run_cli(*args: str):
    return CliRunner().invoke(cli, list(args), input="a long password\n")


@pytest.mark.usefixtures("root_handlers_restored")
@pytest.mark.parametrize("args", DATABASE_COMMANDS, ids=lambda args: " ".join(args[:2]))
def test_a_database_command_without_a_config_file_says_so_and_makes_nothing(outside, args):
    result = run_cli(*args)

    assert result.exit_code == 1
    assert result.stdout == ""
    assert result.stderr == f"appliance: {NO_CONFIG_FILE}\n"
    assert list(outside.iterdir()) == []


@pytest.mark.usefixtures("root_handlers_restored")
def test_init_in_an_empty_folder_outside_a_checkout_still_makes_the_data_there(outside):
    result = run_cli("init")

    assert result.exit_code == 0, result.output
    assert (outside / "data" / "appliance.db").is_file()
    assert f"created database {outside / 'data' / 'appliance.db'}" in result.stdout


@pytest.mark.usefixtures("root_handlers_restored")
def test_a_checkouts_command_finds_the_checkouts_config_from_any_folder(tmp_path, monkeypatch):
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    (checkout / "pyproject.toml").write_text('[project]\nname = "ai-media-maker"\n')
    (checkout / "config.toml").write_text('[storage]\ndata_dir = "state"\n'
                                          'database = "state/app.db"\n')
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.delenv("APPLIANCE_CONFIG", raising=False)
    monkeypatch.setattr(config_module, "CHECKOUT", checkout)

    assert run_cli("init").exit_code == 0
    created = run_cli("accounts", "create", "you@example.com", "--credits", "6",
                      "--password-stdin")
    made_key = run_cli("keys", "create", "you@example.com", "--name", "Development")
    listed = run_cli("keys", "list", "you@example.com")

    assert created.exit_code == 0 and "with 6 credits" in created.stdout, created.output
    assert made_key.exit_code == 0, made_key.output
    assert listed.exit_code == 0 and "Development" in listed.stdout, listed.output
    assert (checkout / "state" / "app.db").is_file()
    assert list(elsewhere.iterdir()) == []


def test_the_config_in_the_folder_comes_before_the_checkouts(tmp_path, monkeypatch):
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    (checkout / "pyproject.toml").write_text("")
    (checkout / "config.toml").write_text("[server]\nport = 1001\n")
    (tmp_path / "config.toml").write_text("[server]\nport = 1002\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("APPLIANCE_CONFIG", raising=False)
    monkeypatch.setattr(config_module, "CHECKOUT", checkout)

    assert config_module.load_config().server.port == 1002
    (tmp_path / "config.toml").unlink()
    assert config_module.load_config().server.port == 1001


def test_code_run_from_this_checkout_finds_its_config_from_another_folder(tmp_path):
    # A process of its own, as `.venv/bin/appliance` is: no test has moved anything.
    env = {name: value for name, value in os.environ.items() if name != "APPLIANCE_CONFIG"}
    found = subprocess.run(
        [sys.executable, "-c",
         "from appliance.core.config import find_config_file; print(find_config_file(None)[0])"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=30, check=True)

    assert found.stdout.strip() == str(ROOT / "config.toml")


def test_transformers_notice_about_torchvision_is_dropped_and_its_other_warnings_kept():
    import appliance.engine  # noqa: F401  (installs the filter)

    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())  # type: ignore[method-assign]
    source = logging.getLogger("transformers.utils.import_utils")
    source.addHandler(handler)
    try:
        source.warning("`CLIPImageProcessor` requires torchvision (not installed); falling back"
                       " to `CLIPImageProcessorPil` for backward compatibility.")
        source.warning("Could not import module 'X'.")
    finally:
        source.removeHandler(handler)

    assert seen == ["Could not import module 'X'."]


def test_refused_for_want_of_credits_a_user_is_told_to_ask_an_administrator(instant_client):
    client = instant_client
    account = client.account("dev@example.com", credits=1)
    sign_in(client.http, "dev@example.com")

    refused = post_form(client.http, "/console/playground", prompts="a cat\na dog")

    assert refused.status_code == 402
    assert "Insufficient credits. Ask an administrator to grant you credits." in refused.text
    assert 'href="/console/admin/accounts"' not in refused.text
    assert client.balance(account) == 1


def test_refused_for_want_of_credits_an_admin_is_sent_to_the_accounts_page(instant_client):
    client = instant_client
    admin = accounts.create_account(client.database.db(), "admin@example.com", PASSWORD,
                                    audit.Actor.cli(), is_admin=True, credits=0)
    sign_in(client.http, "admin@example.com")

    refused = post_form(client.http, "/console/playground", prompts="a cat")

    assert refused.status_code == 402
    assert "Insufficient credits." in refused.text
    assert ('Grant your account credits on the <a href="/console/admin/accounts">Accounts'
            ' page</a>.') in refused.text
    assert client.http.get("/console/admin/accounts").status_code == 200
    assert client.balance(admin) == 0


def test_a_refusal_for_another_reason_has_no_word_about_credits(instant_client):
    client = instant_client
    client.account("dev@example.com", credits=5)
    sign_in(client.http, "dev@example.com")

    refused = post_form(client.http, "/console/playground", prompts="\n")

    assert refused.status_code == 400
    assert "grant" not in refused.text.lower()


def _third_party_lines(text: str) -> list[str]:
    """Lines that are not the service's own log records (logfmt, `ts=` first)."""
    return [line for line in text.splitlines() if line.strip() and not line.startswith("ts=")]


@pytest.mark.system
def test_serve_and_generate_start_without_notices_from_other_libraries(fresh_server, tmp_path):
    base, config, _process, log_path = fresh_server
    deadline = time.monotonic() + 120
    while httpx.get(f"{base}/readyz").status_code != 200:
        assert time.monotonic() < deadline, log_path.read_text()
        time.sleep(0.2)
    env = {name: value for name, value in os.environ.items() if name != "APPLIANCE_CONFIG"}
    command = [sys.executable, "-m", "appliance"]
    created = subprocess.run([*command, "accounts", "create", "you@example.com", "--credits",
                              "1", "--password-stdin", "--config", str(config)],
                             input="a long password\n", env=env, capture_output=True, text=True)
    assert created.returncode == 0, created.stderr
    key = subprocess.run([*command, "keys", "create", "you@example.com", "--name", "Test",
                          "--config", str(config)],
                         env=env, check=True, capture_output=True, text=True).stdout.strip()

    generated = subprocess.run([*command, "generate", "a red fox", "--url", base, "--quiet",
                                "--out", str(tmp_path / "images")],
                               env={**env, "AI_MEDIA_MAKER_API_KEY": key},
                               capture_output=True, text=True, timeout=120)

    assert generated.returncode == 0, generated.stderr
    assert generated.stderr == ""
    served = log_path.read_text()
    assert "torchvision" not in served
    assert _third_party_lines(served) == []
    assert "msg=\"ready: serving on" in served


@pytest.mark.system
def test_the_playground_says_where_credits_come_from_in_a_browser(forked_server):
    # Imported here: that module skips itself where chromium is missing, which must not
    # skip this module's quick tests.
    from .browser_helpers import ARTIFACTS, CHROMIUM, CHROMIUM_ARGS, sync_playwright
    from .browser_helpers import sign_in as sign_in_page

    base, config, _process, _log = forked_server
    database = ConnectionPool(config_module.load_config(config).storage.database)
    for email, is_admin in (("admin@example.com", True), ("user@example.com", False)):
        accounts.create_account(database.db(), email, PASSWORD, audit.Actor.cli(),
                                is_admin=is_admin, credits=0)
    database.close()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            for email, width in (("admin@example.com", 1280), ("user@example.com", 390)):
                page = browser.new_context(base_url=base,
                                           viewport={"width": width, "height": 800}).new_page()
                sign_in_page(page, base, email)
                page.goto("/console/playground")
                page.fill("textarea[name=prompts]", "A red bicycle")
                page.click("button:has-text('Generate')")
                alert = page.inner_text("[role=alert]")
                page.screenshot(path=str(ARTIFACTS / f"playground-no-credits-{width}.png"),
                                full_page=True)
                assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
                if email.startswith("admin"):
                    assert alert == ("Insufficient credits. Grant your account credits on the"
                                     " Accounts page.")
                    page.click("[role=alert] a")
                    page.wait_for_url(f"{base}/console/admin/accounts")
                else:
                    assert alert == ("Insufficient credits. Ask an administrator to grant you"
                                     " credits.")
                page.context.close()
        finally:
            browser.close()
