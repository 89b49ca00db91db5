"""Idempotency-Key on POST /api/playground/images: a retry is answered, never charged twice."""

from __future__ import annotations

from datetime import timedelta

import pytest

from appliance.accounts import accounts, audit
from appliance.core.clock import utc_clock, utc_iso

from .helpers import bearer, count_rows

URL = "/api/playground/images"


def post(client, key, prompts, idempotency_key=None, **fields):
    headers = bearer(key)
    if idempotency_key is not None:
        headers["Idempotency-Key"] = idempotency_key
    return client.http.post(URL, json={"prompts": prompts, **fields}, headers=headers)


def job_count(client) -> int:
    return count_rows(client.database.db(), "jobs")


def test_a_retry_gets_the_first_answer_and_is_not_charged_again(instant_client):
    client = instant_client
    account = client.account(credits=6)
    key = client.key(account)

    first = post(client, key, ["a sunset", "a city"], "order-42")
    again = post(client, key, ["a sunset", "a city"], "order-42")

    assert first.status_code == again.status_code == 200
    assert again.json() == first.json()
    assert first.json()["credits"] == 4
    assert "idempotent-replayed" not in first.headers
    assert again.headers["idempotent-replayed"] == "true"
    assert client.balance(account) == 4 == accounts.ledger_total(client.database.db(), account.id)
    assert job_count(client) == 1
    # The replayed job is the real one, and it is generated once.
    job = client.wait_for_job(key, again.json()["jobId"])
    assert job["status"] == "completed" and job["totalImages"] == 2


def test_the_key_belongs_to_the_account_not_to_one_api_key(instant_client):
    client = instant_client
    account = client.account(credits=6)
    first = post(client, client.key(account, "One"), ["a"], "same-key")
    second = post(client, client.key(account, "Two"), ["a"], "same-key")
    assert second.json()["jobId"] == first.json()["jobId"]
    assert client.balance(account) == 5


def test_other_accounts_may_use_the_same_key_for_their_own_jobs(instant_client):
    client = instant_client
    alice, bob = client.account("alice@example.com", 3), client.account("bob@example.com", 3)
    for_alice = post(client, client.key(alice), ["a"], "shared")
    for_bob = post(client, client.key(bob), ["a"], "shared")
    assert for_alice.status_code == for_bob.status_code == 200
    assert for_alice.json()["jobId"] != for_bob.json()["jobId"]
    assert client.balance(alice) == client.balance(bob) == 2


@pytest.mark.parametrize("changed", [
    {"prompts": ["another prompt"]},
    {"prompts": ["a sunset"], "steps": 3},
])
def test_the_same_key_with_another_request_is_refused_with_422(instant_client, changed):
    client = instant_client
    account = client.account(credits=6)
    key = client.key(account)
    assert post(client, key, ["a sunset"], "k1").status_code == 200

    response = client.http.post(URL, json=changed,
                                headers={**bearer(key), "Idempotency-Key": "k1"})

    assert response.status_code == 422
    assert "already used with a different request" in response.json()["error"]
    assert client.balance(account) == 5
    assert job_count(client) == 1


def test_field_order_does_not_make_another_request(instant_client):
    client = instant_client
    account = client.account(credits=6)
    key = client.key(account)
    headers = {**bearer(key), "Idempotency-Key": "k2", "Content-Type": "application/json"}
    first = client.http.post(URL, content=b'{"prompts": ["a"], "steps": 2}', headers=headers)
    second = client.http.post(URL, content=b'{"steps":2,"prompts":["a"]}', headers=headers)
    assert second.json() == first.json() and second.headers["idempotent-replayed"] == "true"


@pytest.mark.parametrize("value", ["", " ", "x" * 256, "caf\u00e9", "two words"])
def test_a_malformed_key_is_refused_with_400_before_anything_is_charged(instant_client, value):
    client = instant_client
    account = client.account(credits=6)
    key = client.key(account)
    response = client.http.post(URL, json={"prompts": ["a"]},
                                headers={**bearer(key), "Idempotency-Key": value.encode()})
    assert response.status_code == 400
    assert "Idempotency-Key" in response.json()["error"]
    assert client.balance(account) == 6 and job_count(client) == 0


def test_a_refused_request_is_not_remembered_so_its_retry_can_succeed(instant_client):
    client = instant_client
    account = client.account(credits=1)
    key = client.key(account)
    assert post(client, key, ["a", "b"], "k3").status_code == 402
    accounts.grant_credits(client.database.db(), account.email, 5, audit.Actor.cli())
    retry = post(client, key, ["a", "b"], "k3")
    assert retry.status_code == 200 and "idempotent-replayed" not in retry.headers
    assert client.balance(account) == 4


def test_a_key_is_kept_for_24_hours_then_starts_a_new_job(instant_client):
    client = instant_client
    account = client.account(credits=6)
    key = client.key(account)
    first = post(client, key, ["a"], "daily-run").json()
    db = client.database.db()
    # As if the first request had been made 24 hours and a minute ago.
    db.execute("UPDATE idempotency_keys SET created_at = ?",
               [utc_iso(utc_clock() - timedelta(minutes=1441))])

    later = post(client, key, ["a"], "daily-run")

    assert later.status_code == 200 and later.json()["jobId"] != first["jobId"]
    assert "idempotent-replayed" not in later.headers
    assert client.balance(account) == 4
    # The expired row made way for the new one.
    assert count_rows(db, "idempotency_keys") == 1


def test_only_a_digest_of_the_key_is_stored(instant_client):
    client = instant_client
    account = client.account(credits=6)
    post(client, client.key(account), ["a"], "my-secret-ish-key")
    row = next(client.database.db().query("SELECT * FROM idempotency_keys"))
    assert "my-secret-ish-key" not in repr(row)
