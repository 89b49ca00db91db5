"""Cancelling a job: images not started are cancelled and refunded through the ledger."""

from __future__ import annotations

import uuid

import pytest

from appliance.accounts import accounts

from .helpers import InstantGenerator, bearer
from .live_server import GatedGenerator

# The store's accounting on both databases: SQLite's file and cluster mode's PostgreSQL.
pytestmark = pytest.mark.both_databases

URL = "/api/playground/images"


def ledger_reasons(db, account_id: int) -> list[tuple[str, int]]:
    return [(r["reason"], r["delta"]) for r in db.query(
        "SELECT reason, delta FROM credit_ledger WHERE account_id = ? ORDER BY id", [account_id])]


def test_cancel_refunds_images_not_started_and_settles_the_job(make_client, make_config):
    config = make_config(engine={"batch_size": 1})
    gated = GatedGenerator(InstantGenerator())
    client = make_client(load_generator=lambda: gated, app_config=config)
    account = client.account(credits=10)
    key = client.key(account)

    running = client.http.post(URL, json={"prompts": ["a", "b", "c"]}, headers=bearer(key)).json()
    waiting = client.http.post(URL, json={"prompts": ["d", "e"]}, headers=bearer(key)).json()
    assert gated.started.wait(30)  # image 0 of the first job is in the pipeline

    queued = client.http.get(f"{URL}/{waiting['jobId']}", headers=bearer(key)).json()
    assert queued["status"] == "queued" and queued["queuePosition"] == 2

    cancelled = client.http.delete(f"{URL}/{waiting['jobId']}", headers=bearer(key))
    assert cancelled.status_code == 200
    body = cancelled.json()
    assert body["status"] == "cancelled" and body["finishedAt"]
    assert [i["status"] for i in body["images"]] == ["cancelled", "cancelled"]
    assert (body["cancelledImages"], body["creditsRefunded"], body["pendingImages"]) == (2, 2, 0)
    assert body["queuePosition"] is None
    # Out of the queue at once: only the first job's two waiting images hold places.
    queue = client.services.engine.queue
    assert len(queue) == 2

    partly = client.http.delete(f"{URL}/{running['jobId']}", headers=bearer(key)).json()
    assert [i["status"] for i in partly["images"]] == ["running", "cancelled", "cancelled"]
    assert partly["status"] == "processing" and partly["creditsRefunded"] == 2
    assert len(queue) == 0
    assert client.balance(account) == 10 - 5 + 4

    gated.gate.set()
    job = client.wait_for_job(key, running["jobId"])
    # The image that was running finished and stays paid for.
    assert job["status"] == "completed"
    assert [i["status"] for i in job["images"]] == ["completed", "cancelled", "cancelled"]
    assert (job["completedImages"], job["cancelledImages"], job["creditsRefunded"]) == (1, 2, 2)

    # A repeat changes nothing and refunds nothing.
    again = client.http.delete(f"{URL}/{running['jobId']}", headers=bearer(key))
    assert again.status_code == 200 and again.json()["creditsRefunded"] == 2

    db = client.database.db()
    assert client.balance(account) == 9
    assert accounts.ledger_total(db, account.id) == 9
    assert ledger_reasons(db, account.id) == [
        ("initial grant", 10), ("image job", -3), ("image job", -2),
        ("refund: image cancelled", 2), ("refund: image cancelled", 2)]
    # The worker skipped the cancelled images: none was ever started.
    assert db.execute("SELECT COUNT(*) FROM job_images WHERE status = 'cancelled'"
                      " AND started_at IS NOT NULL").fetchone()[0] == 0


def test_a_finished_job_cannot_be_cancelled_into_a_refund(instant_client):
    client = instant_client
    account = client.account(credits=3)
    key = client.key(account)
    job_id = client.http.post(URL, json={"prompts": ["a"]}, headers=bearer(key)).json()["jobId"]
    client.wait_for_job(key, job_id)
    response = client.http.delete(f"{URL}/{job_id}", headers=bearer(key))
    assert response.status_code == 200
    assert (response.json()["status"], response.json()["creditsRefunded"]) == ("completed", 0)
    assert client.balance(account) == 2 == accounts.ledger_total(client.database.db(), account.id)


def test_another_accounts_job_cannot_be_cancelled(instant_client):
    client = instant_client
    owner = client.account("owner@example.com")
    owner_key = client.key(owner)
    other_key = client.key(client.account("other@example.com"))
    created = client.http.post(URL, json={"prompts": ["x"]}, headers=bearer(owner_key))
    job_id = created.json()["jobId"]
    for target in (job_id, str(uuid.uuid4())):
        response = client.http.delete(f"{URL}/{target}", headers=bearer(other_key))
        assert (response.status_code, response.json()) == (404, {"error": "Job not found"})
    assert client.http.delete(f"{URL}/{job_id}").status_code == 401
    assert client.wait_for_job(owner_key, job_id)["status"] == "completed"
    assert client.balance(owner) == 5
