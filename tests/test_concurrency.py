"""Many clients at once against a real `appliance serve`: no double charge, never below zero."""

from __future__ import annotations

import threading
from collections import Counter

import httpx
import pytest

from appliance.accounts import accounts, audit, keys
from appliance.core.database import ConnectionPool

from .serve_process import ServeProcess, write_config

pytestmark = pytest.mark.system

URL = "/api/playground/images"


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model, launcher):
    folder = tmp_path_factory.mktemp("concurrency")
    process = ServeProcess(write_config(folder, tiny_model), folder / "serve.log",
                           launcher).start()
    database = ConnectionPool(folder / "data" / "appliance.db")
    yield process, database
    database.close()
    process.stop()


def account_with_key(database: ConnectionPool, email: str,
                     credits: int) -> tuple[accounts.Account, str]:
    db = database.db()
    account = accounts.create_account(db, email, "correct horse battery", audit.Actor.cli(),
                                      credits=credits)
    return account, keys.create_key(db, account.id, "Load", audit.Actor.cli())[1]


def all_at_once(count: int, request) -> list[httpx.Response]:
    """Runs request(client) on `count` threads released together; returns their answers."""
    barrier = threading.Barrier(count)
    answers: list[httpx.Response | None] = [None] * count

    def run(index: int) -> None:
        with httpx.Client(timeout=60) as client:
            barrier.wait()
            answers[index] = request(client)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    received = [answer for answer in answers if answer is not None]
    assert len(received) == count, "a client got no answer"
    return received


def assert_books_balance(database: ConnectionPool, account: accounts.Account) -> int:
    db = database.db()
    balance = accounts.get_account(db, account.id).credits
    assert balance >= 0
    assert balance == accounts.ledger_total(db, account.id)
    lowest = db.execute("SELECT MIN(balance_after) FROM credit_ledger WHERE account_id = ?",
                        [account.id]).fetchone()[0]
    assert lowest >= 0, "the balance never went below zero, not even for a moment"
    return balance


def test_concurrent_requests_charge_exactly_the_affordable_ones(server):
    process, database = server
    account, key = account_with_key(database, "crowd@example.com", credits=12)
    headers = {"Authorization": f"Bearer {key}"}

    answers = all_at_once(40, lambda c: c.post(process.url + URL, json={"prompts": ["a"]},
                                               headers=headers))

    statuses = Counter(a.status_code for a in answers)
    assert statuses == {200: 12, 402: 28}, statuses
    refused = [a.json() for a in answers if a.status_code == 402]
    assert all(body == {"error": "Insufficient credits"} for body in refused)
    left = sorted(a.json()["credits"] for a in answers if a.status_code == 200)
    assert left == list(range(12)), "each charge saw the balance the one before it left"
    assert assert_books_balance(database, account) == 0
    assert database.db().execute(
        "SELECT COUNT(*), SUM(credits_used) FROM jobs WHERE account_id = ?",
        [account.id]).fetchone() == (12, 12)


def test_concurrent_bulk_requests_never_overdraw(server):
    process, database = server
    account, key = account_with_key(database, "bulk@example.com", credits=10)
    headers = {"Authorization": f"Bearer {key}"}

    answers = all_at_once(20, lambda c: c.post(process.url + URL, json={"prompts": ["a"] * 3},
                                               headers=headers))

    # 3 + 3 + 3 fit in 10; after them 1 credit is left, too few for any other.
    assert Counter(a.status_code for a in answers) == {200: 3, 402: 17}
    assert assert_books_balance(database, account) == 1


def test_concurrent_retries_with_one_idempotency_key_charge_once(server):
    process, database = server
    account, key = account_with_key(database, "retry@example.com", credits=5)
    headers = {"Authorization": f"Bearer {key}", "Idempotency-Key": "upload-7f3a"}

    answers = all_at_once(16, lambda c: c.post(process.url + URL, json={"prompts": ["a", "b"]},
                                               headers=headers))

    assert {a.status_code for a in answers} == {200}
    assert len({a.json()["jobId"] for a in answers}) == 1
    assert len({a.text for a in answers}) == 1, "every retry gets the very first answer"
    assert sum(a.headers.get("idempotent-replayed") == "true" for a in answers) == 15
    assert assert_books_balance(database, account) == 3
    assert database.db().execute("SELECT COUNT(*) FROM jobs WHERE account_id = ?",
                              [account.id]).fetchone()[0] == 1


def test_concurrent_requests_reusing_a_key_for_other_bodies_are_refused(server):
    process, database = server
    account, key = account_with_key(database, "mixup@example.com", credits=50)
    counter = iter(range(1000))
    lock = threading.Lock()

    def request(client):
        with lock:
            n = next(counter)
        return client.post(process.url + URL, json={"prompts": [f"prompt {n % 4}"]},
                           headers={"Authorization": f"Bearer {key}", "Idempotency-Key": "k"})

    answers = all_at_once(12, request)

    accepted = [a for a in answers if a.status_code == 200]
    refused = [a for a in answers if a.status_code == 422]
    assert len(accepted) + len(refused) == 12 and accepted and refused
    assert len({a.json()["jobId"] for a in accepted}) == 1
    assert assert_books_balance(database, account) == 49
