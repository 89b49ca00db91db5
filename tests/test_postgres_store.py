"""The store on PostgreSQL (cluster mode): what differs from SQLite, on a real server."""

from __future__ import annotations

import threading

import pytest

from appliance.core.database import connect, migrate
from appliance.core.database_url import DatabaseUrl
from appliance.core.errors import BadRequest
from appliance.core.postgres import placeholders
from appliance.ops.backup import create_backup, restore_backup

from .helpers import bearer

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
