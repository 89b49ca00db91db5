"""Console sign-in throttling that a stranger cannot turn against an account.

Failures count per account and client address, and per address; past the free
ones, waits grow (1 s, 2 s, 4 s...). The app runs on a real database behind
Litestar's TestClient, reached from addresses the tests choose, and the
throttle reads a clock the tests move by hand instead of sleeping.
"""

from __future__ import annotations

import dataclasses
import json
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner
from litestar.testing import TestClient
from litestar.types import Receive, Scope, Send
from sqlite_utils import Database

from appliance.accounts import accounts, audit
from appliance.accounts.service import SignInService
from appliance.accounts.signin import SignInLimits
from appliance.cli.main import cli
from appliance.core.clock import utc_clock
from appliance.core.config import Config, load_config
from appliance.core.errors import TooManyRequests, Unauthorized
from appliance.services import Services
from appliance.web.app import create_app

from .console_helpers import HTML, PASSWORD, post_form, session_id, sign_in
from .helpers import InstantGenerator

STRANGER, OWNER = "10.0.0.9", "10.0.0.5"


class ManualClock:
    """Stands still at the second the test began until the test moves it on."""

    def __init__(self) -> None:
        # Whole seconds, as the database keeps milliseconds: a moment the test computes
        # is then exactly the moment stored.
        self.now = utc_clock().replace(microsecond=0)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


class FromAddress:
    """The app as reached from `address` (Litestar's TestClient always says "testclient")."""

    def __init__(self, app: Callable) -> None:
        self.app = app
        self.address = OWNER

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            scope = {**scope, "client": (self.address, 50000)}  # type: ignore[typeddict-item]
        await self.app(scope, receive, send)


@dataclass
class Console:
    http: TestClient
    db: Database
    clock: ManualClock
    via: FromAddress
    config: Config

    def sign_in(self, email: str, password: str = PASSWORD, *, at: str):
        self.via.address = at
        return sign_in(self.http, email, password)

    def account(self, email: str, *, admin: bool = False) -> accounts.Account:
        return accounts.create_account(self.db, email, PASSWORD, audit.Actor.cli(),
                                       is_admin=admin)

    def audit(self, action: str) -> list[dict]:
        return list(self.db.query("SELECT * FROM audit_log WHERE action = ? ORDER BY id",
                                  [action]))


@pytest.fixture
def make_console(make_config) -> Iterator[Callable[..., Console]]:
    opened: list[tuple[TestClient, Services]] = []

    def make(**console_settings) -> Console:
        config = make_config(console=console_settings)
        clock = ManualClock()
        services = Services.build(config, load_generator=InstantGenerator)
        services = dataclasses.replace(services, signin=SignInService(
            services.database, SignInLimits.from_config(config.console), clock))
        via = FromAddress(create_app(services))
        http = TestClient(via)  # type: ignore[arg-type]
        http.__enter__()
        opened.append((http, services))
        return Console(http, services.database.db(), clock, via, config)

    yield make
    for http, _ in opened:
        http.__exit__(None, None, None)


@pytest.fixture
def console(make_console) -> Console:
    return make_console()


def fail(console: Console, email: str, *, at: str, times: int = 1) -> None:
    for _ in range(times):
        response = console.sign_in(email, "a wrong guess", at=at)
        assert response.status_code == 401, response.text
        assert "The email or password is not right" in response.text


def retry_after(response) -> int:
    assert response.status_code == 429, response.text
    return int(response.headers["retry-after"])


def test_a_strangers_failures_from_another_address_never_lock_the_owner_out(console):
    alice = console.account("alice@example.com")
    # Five free failures, then each further one makes the stranger wait longer.
    fail(console, "alice@example.com", at=STRANGER, times=6)
    for wait in (1, 2, 4, 8):
        assert retry_after(console.sign_in("alice@example.com", at=STRANGER)) == wait
        console.clock.advance(wait)
        fail(console, "alice@example.com", at=STRANGER)
    # Even the right password waits there (16 s now): the password is not checked.
    assert retry_after(console.sign_in("alice@example.com", at=STRANGER)) == 16

    # Alice, at her own address, signs in at once.
    signed_in = console.sign_in("alice@example.com", at=OWNER)
    assert signed_in.status_code == 303 and session_id(console.http)
    assert console.http.get("/console", headers=HTML).status_code == 200

    # Her success does not clear the stranger's count at his address.
    post_form(console.http, "/logout")
    assert retry_after(console.sign_in("alice@example.com", at=STRANGER)) == 16
    failed = console.audit("login.failed")
    assert {(row["account_id"], row["ip_address"]) for row in failed} == {(alice.id, STRANGER)}
    assert len(failed) == 10
    assert [row["ip_address"] for row in console.audit("login.success")] == [OWNER]
    assert len(console.audit("login.throttled")) == 6


def test_waits_double_past_the_free_failures_up_to_the_maximum_and_say_when_to_retry(
        make_console):
    console = make_console(signin_max_wait_seconds=120)
    console.account("alice@example.com")
    fail(console, "alice@example.com", at=OWNER, times=5)
    # The fifth failure is still free: the sixth attempt goes ahead at once.
    fail(console, "alice@example.com", at=OWNER)
    waits, messages = [], []
    for _ in range(9):
        refused = console.sign_in("alice@example.com", "another guess", at=OWNER)
        waits.append(retry_after(refused))
        messages.append(refused.text)
        # A second before the wait ends it is still refused, and refusals do not count.
        console.clock.advance(waits[-1] - 1)
        assert retry_after(console.sign_in("alice@example.com", at=OWNER)) == 1
        console.clock.advance(1)
        fail(console, "alice@example.com", at=OWNER)
    assert waits == [1, 2, 4, 8, 16, 32, 64, 120, 120]
    assert "Too many failed sign-ins; try again in 1 second<" in messages[0]
    assert "try again in 16 seconds" in messages[4]
    assert "try again in 2 minutes" in messages[6]
    assert "try again in 2 minutes" in messages[8]


def test_counts_are_forgotten_after_a_quiet_window(make_console):
    console = make_console(signin_window_minutes=10)
    console.account("alice@example.com")
    fail(console, "alice@example.com", at=OWNER, times=6)
    console.clock.advance(1)
    fail(console, "alice@example.com", at=OWNER)
    assert retry_after(console.sign_in("alice@example.com", at=OWNER)) == 2
    # Ten minutes after the wait ended, the count is still held...
    console.clock.advance(2 + 600)
    fail(console, "alice@example.com", at=OWNER)
    assert retry_after(console.sign_in("alice@example.com", at=OWNER)) == 4
    # ...and past them it is forgotten: five free failures again.
    console.clock.advance(4 + 601)
    fail(console, "alice@example.com", at=OWNER, times=5)
    assert console.sign_in("alice@example.com", at=OWNER).status_code == 303


def test_one_address_trying_many_accounts_is_slowed_whatever_the_emails(console):
    bob = console.account("bob@example.com")
    console.account("carol@example.com")
    # Twenty free failures from one address, four to each email (each under its own
    # five), known accounts and unknown emails alike; then the address waits.
    for email in ("bob@example.com", "carol@example.com", "x@example.com", "y@example.com",
                  "z@example.com"):
        fail(console, email, at=STRANGER, times=4)
    fail(console, "dave@example.com", at=STRANGER)
    assert retry_after(console.sign_in("bob@example.com", at=STRANGER)) == 1
    assert retry_after(console.sign_in("new@example.com", "guess", at=STRANGER)) == 1
    # Bob elsewhere is not held up.
    assert console.sign_in("bob@example.com", at=OWNER).status_code == 303
    unknown = [row for row in console.audit("login.failed") if row["account_id"] is None]
    assert len(unknown) == 13
    assert json.loads(unknown[-1]["details"]) == {"email": "dave@example.com",
                                                  "reason": "unknown account"}
    assert console.audit("login.success")[0]["account_id"] == bob.id


def test_an_unknown_email_is_throttled_exactly_like_an_account(console):
    console.account("alice@example.com")

    def waits(email: str, address: str) -> list[int]:
        fail(console, email, at=address, times=6)
        seen = []
        for _ in range(3):
            seen.append(retry_after(console.sign_in(email, "guess", at=address)))
            console.clock.advance(seen[-1])
            fail(console, email, at=address)
        return seen

    # Throttling does not tell which accounts exist.
    assert waits("alice@example.com", "10.0.0.1") == waits("nobody@example.com", "10.0.0.2")


def test_a_success_clears_its_own_account_and_address_only(make_console):
    console = make_console(max_failed_signins_per_address=8)
    console.account("alice@example.com")
    console.account("bob@example.com")
    fail(console, "alice@example.com", at=OWNER, times=6)
    assert retry_after(console.sign_in("alice@example.com", at=OWNER)) == 1
    console.clock.advance(1)
    assert console.sign_in("alice@example.com", at=OWNER).status_code == 303
    post_form(console.http, "/logout")
    # Alice's count there starts again: five free failures.
    fail(console, "alice@example.com", at=OWNER, times=5)
    assert console.sign_in("alice@example.com", at=OWNER).status_code == 303
    post_form(console.http, "/logout")
    # Her cleared failures no longer count for the address either: with them, Bob's
    # five would take it past its eight.
    fail(console, "bob@example.com", at=OWNER, times=5)
    assert console.sign_in("bob@example.com", at=OWNER).status_code == 303


def test_simultaneous_attempts_cannot_all_slip_past_the_throttle(config, database):
    accounts.create_account(database.db(), "alice@example.com", PASSWORD, audit.Actor.cli())
    clock = ManualClock()
    service = SignInService(database, SignInLimits.from_config(config.console), clock)
    start = threading.Barrier(20)

    def attempt(_: int) -> str:
        start.wait()
        try:
            service.sign_in("alice@example.com", "a wrong guess", audit.Actor(STRANGER))
        except (Unauthorized, TooManyRequests) as refusal:
            return type(refusal).__name__
        return "signed in"

    with ThreadPoolExecutor(20) as pool:
        outcomes = list(pool.map(attempt, range(20)))
    # Five free failures and the sixth, which starts the waits; every other attempt
    # came while the first wait ran and was refused without its password checked.
    assert sorted(outcomes) == ["TooManyRequests"] * 14 + ["Unauthorized"] * 6
    rows = database.db().execute("SELECT COUNT(*) FROM audit_log WHERE action = ?",
                                 ["login.failed"]).fetchone()
    assert rows[0] == 6


def test_many_addresses_guessing_one_account_slow_it_by_seconds_never_at_home(make_console):
    console = make_console(max_failed_signins_per_account=10, signin_account_wait_seconds=5)
    console.account("alice@example.com")
    assert console.sign_in("alice@example.com", at=OWNER).status_code == 303
    post_form(console.http, "/logout")
    # One guess from each of eleven addresses passes the account's ten.
    for n in range(11):
        fail(console, "alice@example.com", at=f"10.1.0.{n}")
    refused = console.sign_in("alice@example.com", "guess", at="10.1.0.99")
    assert retry_after(refused) == 5 and "try again in 5 seconds" in refused.text
    # At an address she has signed in from, Alice is not slowed at all...
    assert console.sign_in("alice@example.com", at=OWNER).status_code == 303
    post_form(console.http, "/logout")
    # ...and at a new one, by those seconds only.
    assert retry_after(console.sign_in("alice@example.com", at="10.0.0.6")) == 5
    console.clock.advance(5)
    assert console.sign_in("alice@example.com", at="10.0.0.6").status_code == 303


def admin_signed_in(console: Console) -> None:
    console.account("admin@example.com", admin=True)
    assert console.sign_in("admin@example.com", at="10.0.0.1").status_code == 303


def test_an_administrator_unlocks_an_account_on_the_accounts_page(console):
    alice = console.account("alice@example.com")
    bob = console.account("bob@example.com")
    fail(console, "alice@example.com", at=STRANGER, times=6)
    fail(console, "alice@example.com", at=OWNER, times=6)
    admin_signed_in(console)

    page = console.http.get("/console/admin/accounts")
    assert page.status_code == 200
    assert f'action="/console/admin/accounts/{alice.id}/unlock"' in page.text
    assert f'action="/console/admin/accounts/{bob.id}/unlock"' not in page.text
    assert page.text.count(">throttled<") == 1

    # Without the form's token nothing happens.
    forged = console.http.post(f"/console/admin/accounts/{alice.id}/unlock",
                               data={"_csrf_token": "0" * 128}, follow_redirects=False)
    assert forged.status_code == 403
    assert console.audit("login.unlocked") == []
    assert post_form(console.http, "/console/admin/accounts/999999/unlock").status_code == 404

    done = post_form(console.http, f"/console/admin/accounts/{alice.id}/unlock")
    assert done.status_code == 303 and done.headers["location"] == "/console/admin/accounts"
    page = console.http.get("/console/admin/accounts")
    assert "Unlocked sign-in for alice@example.com: 12 failed sign-ins forgotten." in page.text
    assert "/unlock" not in page.text and ">throttled<" not in page.text
    [unlocked] = console.audit("login.unlocked")
    assert unlocked["account_id"] == alice.id and unlocked["ip_address"] == "10.0.0.1"
    assert json.loads(unlocked["details"]) == {"email": "alice@example.com", "failures": 12,
                                               "by": "admin@example.com"}
    post_form(console.http, "/logout")

    # Failures before the unlock count no more, from either address: five free again.
    fail(console, "alice@example.com", at=STRANGER, times=6)
    assert retry_after(console.sign_in("alice@example.com", at=STRANGER)) == 1
    assert console.sign_in("alice@example.com", at=OWNER).status_code == 303


def test_only_administrators_unlock(console):
    alice = console.account("alice@example.com")
    console.account("bob@example.com")
    fail(console, "alice@example.com", at=STRANGER, times=6)
    assert console.sign_in("bob@example.com", at=OWNER).status_code == 303
    refused = post_form(console.http, f"/console/admin/accounts/{alice.id}/unlock")
    assert refused.status_code == 403
    assert console.audit("login.unlocked") == []
    assert retry_after(console.sign_in("alice@example.com", at=STRANGER)) == 1


@pytest.mark.usefixtures("root_handlers_restored")
def test_the_unlock_command_clears_the_throttle_and_is_audited(console, tmp_path):
    alice = console.account("alice@example.com")
    fail(console, "alice@example.com", at=STRANGER, times=6)
    assert retry_after(console.sign_in("alice@example.com", at=STRANGER)) == 1
    config_file = tmp_path / "cli.toml"
    storage = console.config.storage
    config_file.write_text(f"[storage]\ndata_dir = {json.dumps(str(storage.data_dir))}\n"
                           f"database = {json.dumps(str(storage.database))}\n")

    def unlock(email: str):
        return CliRunner().invoke(cli, ["accounts", "unlock", email, "--config",
                                        str(config_file)])

    done = unlock("Alice@Example.com")
    assert done.exit_code == 0, done.output
    assert done.stdout == "unlocked sign-in for alice@example.com: 6 failed sign-ins forgotten\n"
    [unlocked] = console.audit("login.unlocked")
    assert unlocked["account_id"] == alice.id and unlocked["user_agent"] == "appliance-cli"
    fail(console, "alice@example.com", at=STRANGER, times=5)

    unknown = unlock("nobody@example.com")
    assert unknown.exit_code == 1
    assert unknown.stderr == "appliance: no account for nobody@example.com\n"
    assert len(console.audit("login.unlocked")) == 1


def test_old_config_files_keep_working(tmp_path):
    # Files written by earlier versions name these keys with their old defaults.
    old = Path(tmp_path / "config.toml")
    old.write_text("[console]\nsignin_window_minutes = 15\nmax_failed_signins_per_account = 5\n"
                   "max_failed_signins_per_address = 20\n")
    limits = SignInLimits.from_config(load_config(old).console)
    assert (limits.window, limits.per_account, limits.per_address) == (
        timedelta(minutes=15), 5, 20)
