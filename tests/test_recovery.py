"""Work accepted before a stop is finished after the next start."""

from __future__ import annotations

import pytest

from appliance.accounts import accounts, audit
from appliance.jobs.models import GenerationSettings
from appliance.jobs.store import image_relpath, mark_running, submit, unfinished_images

from .helpers import TEST_GENERATION

# The store's accounting on both databases: SQLite's file and cluster mode's PostgreSQL.
pytestmark = pytest.mark.both_databases


def test_queued_and_running_images_are_requeued_at_startup(config, database, make_client):
    db = database.db()
    account = accounts.create_account(db, "dev@example.com", "correct horse battery",
                                      audit.Actor.cli(), credits=3)
    settings = GenerationSettings(**TEST_GENERATION)
    submitted = submit(db, account.id, None, ["one", "two", "three"], settings)
    # As if the process had died mid-batch: one image was running.
    mark_running(db, submitted.images[:1])
    client = make_client()
    png = config.images_dir / image_relpath(submitted.job_id, 0)
    key = client.key(account)

    job = client.wait_for_job(key, submitted.job_id)
    assert job["status"] == "completed" and job["completedImages"] == 3
    assert png.exists()
    assert [image["seed"] for image in job["images"]] == [i.seed for i in submitted.images]
    assert client.balance(account) == 0 == accounts.ledger_total(db, account.id)


def test_startup_with_nothing_unfinished_requeues_nothing(database):
    assert unfinished_images(database.db()) == []
