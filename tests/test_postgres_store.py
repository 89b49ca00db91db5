"""The store on PostgreSQL (cluster mode): what differs from SQLite, on a real server."""

from __future__ import annotations

import threading
import time

import pytest

from appliance.accounts import accounts, audit
from appliance.core.database import ConnectionPool, connect, migrate
from appliance.core.database_url import DatabaseUrl
from appliance.core.errors import BadRequest
from appliance.core.postgres import placeholders
from appliance.jobs import shared_queue, store
from appliance.jobs.models import GenerationSettings
from appliance.ops.backup import create_backup, restore_backup

from .helpers import TEST_GENERATION, bearer

URL = "/api/playground/images"


def test_placeholders_become_psycopgs_outside_quoted_text():
    assert placeholders("SELECT ? FROM t WHERE a = '?' AND b LIKE '%x' AND c = ?") == (
        "SELECT %s FROM t WHERE a = '?' AND b LIKE '%%x' AND c = %s")
    assert placeholders('SELECT "odd?name" FROM t WHERE x % 2 = ?') == (
        'SELECT "odd?name" FROM t WHERE x %% 2 = %s')


def test_nodes_starting_together_apply_each_migration_once(postgres):
    url = DatabaseUrl(postgres.new_database())
    applied: list[list[str]] = []
    start = threading.Barrier(4)

    def node() -> None:
        db = connect(url)
        try:
            start.wait()
            applied.append(migrate(db))
        finally:
            db.close()

    threads = [threading.Thread(target=node) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert sorted(applied) == [[], [], [], ["m001_initial"]]
    db = connect(url)
    try:
        assert db.execute("SELECT name FROM appliance_migrations").fetchall() == [("m001_initial",)]
    finally:
        db.close()


@pytest.mark.parametrize("operation", ["backup", "restore"])
def test_backup_and_restore_say_to_use_pg_dump_and_never_show_the_password(
        make_config, tmp_path, operation):
    config = make_config(storage={"database": "postgresql://app:s3cret@db.lan:5432/images"})
    with pytest.raises(BadRequest) as refused:
        if operation == "backup":
            create_backup(config, tmp_path / "backup")
        else:
            restore_backup(config, tmp_path)
    assert "pg_dump --format=custom" in str(refused.value)
    assert "postgresql://app:***@db.lan:5432/images" in str(refused.value)
    assert "s3cret" not in str(refused.value)
    assert not (tmp_path / "backup").exists()


@pytest.mark.parametrize("database_kind", ["postgresql"], indirect=True)
def test_text_with_a_nul_character_is_refused_with_400_and_charges_nothing(instant_client):
    client = instant_client
    account = client.account(credits=2)
    key = client.key(account)
    refused = client.http.post(URL, json={"prompts": ["a\x00b"]}, headers=bearer(key))
    assert (refused.status_code, refused.json()) == (
        400, {"error": "text may not contain the NUL character (U+0000)"})
    assert client.balance(account) == 2
    assert client.http.get(f"{URL}/x%00y", headers=bearer(key)).status_code == 400


def test_claims_take_turns_between_accounts_batch_equal_settings_and_never_overlap(postgres):
    database = ConnectionPool(DatabaseUrl(postgres.new_database()))
    try:
        db = database.db()
        actor = audit.Actor.cli()
        big, small = (accounts.create_account(db, f"{name}@example.com", "long enough pw",
                                              actor, credits=20).id
                      for name in ("big", "small"))
        settings = GenerationSettings(**TEST_GENERATION)
        other = GenerationSettings(**{**TEST_GENERATION, "steps": 3})
        # Jobs in this order (their times are in milliseconds).
        for account_id, prompts, job_settings in ((big, [f"big {n}" for n in range(8)], settings),
                                                  (small, ["small 0", "small 1"], settings),
                                                  (small, ["small other"], other)):
            store.submit(db, account_id, None, prompts, job_settings)
            time.sleep(0.005)

        first = shared_queue.claim_batch(db, "a", 4, 30.0)
        second = shared_queue.claim_batch(db, "b", 4, 30.0)

        # Image by image in turn; a batch holds one settings only.
        assert [image.prompt for image in first] == ["big 0", "small 0", "big 1", "small 1"]
        assert [image.prompt for image in second] == ["big 2", "big 3", "big 4", "big 5"]
        third = shared_queue.claim_batch(db, "a", 4, 30.0)
        assert [image.prompt for image in third] == ["big 6", "big 7"]
        assert [image.prompt for image in shared_queue.claim_batch(db, "b", 4, 30.0)] == [
            "small other"]
        assert shared_queue.claim_batch(db, "a", 4, 30.0) == []
        # Released by b (as at its restart): claimable again, by anyone.
        assert shared_queue.release_claims(db, "b") == 5
        again = shared_queue.claim_batch(db, "a", 8, 30.0)
        assert [image.prompt for image in again] == ["big 2", "big 3", "big 4", "big 5"]
    finally:
        database.close()
