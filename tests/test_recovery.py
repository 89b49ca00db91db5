"""Work accepted before a stop is finished after the next start."""

from __future__ import annotations

from appliance import accounts, audit, jobs
from appliance.jobs import GenerationSettings

from .conftest import TEST_GENERATION


def test_queued_and_running_images_are_requeued_at_startup(store, make_client):
    db = store.db()
    account = accounts.create_account(db, "dev@example.com", "correct horse battery",
                                      audit.Actor.cli(), credits=3)
    settings = GenerationSettings(**TEST_GENERATION)
    submitted = jobs.submit(db, account.id, None, ["one", "two", "three"], settings)
    # As if the process had died mid-batch: one image was running.
    jobs.mark_running(db, submitted.images[:1])
    client = make_client()
    png = store.path.parent / "images" / jobs.image_relpath(submitted.job_id, 0)
    key = client.key(account)

    job = client.wait_for_job(key, submitted.job_id)
    assert job["status"] == "completed" and job["completedImages"] == 3
    assert png.exists()
    assert [image["seed"] for image in job["images"]] == [i.seed for i in submitted.images]
    assert client.balance(account) == 0 == accounts.ledger_total(db, account.id)


def test_startup_with_nothing_unfinished_requeues_nothing(store):
    assert jobs.unfinished_images(store.db()) == []
