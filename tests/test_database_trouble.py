"""A locked or full database: 503 with Retry-After, never a partial charge or a half-made job."""

from __future__ import annotations

import contextlib
import shutil
import sqlite3
import subprocess
import threading
import time
import uuid
from pathlib import Path

import pytest
from PIL import Image

import appliance.core.database as core_database
from appliance.accounts import accounts
from appliance.core.database import ConnectionPool, immediate, open_database

from .helpers import InstantGenerator, bearer

URL = "/api/playground/images"


def db_state(database, account) -> tuple:
    db = database.db()
    return (accounts.get_account(db, account.id).credits, accounts.ledger_total(db, account.id),
            db["jobs"].count, db["job_images"].count, db["credit_ledger"].count)


@contextlib.contextmanager
def write_lock(path):
    """Another writer (a backup, a CLI command) holding the database's write lock."""
    other = sqlite3.connect(str(path), isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    try:
        yield
    finally:
        other.execute("ROLLBACK")
        other.close()


def test_a_locked_database_gets_503_with_retry_after_and_keeps_nothing(make_client, make_config):
    config = make_config(storage={"busy_timeout_seconds": 0.3})
    client = make_client(load_generator=InstantGenerator, app_config=config)
    account = client.account(credits=6)
    key = client.key(account)
    done = client.http.post(URL, json={"prompts": ["a"]}, headers=bearer(key)).json()["jobId"]
    client.wait_for_job(key, done)
    before = db_state(client.database, account)

    with write_lock(config.storage.database):
        started = time.monotonic()
        refused = client.http.post(URL, json={"prompts": ["b", "c"]}, headers=bearer(key))
        waited = time.monotonic() - started
        # Reading still works while another connection writes (WAL).
        status = client.http.get(f"{URL}/{done}", headers=bearer(key))
        openai = client.http.post("/v1/images/generations", json={"prompt": "b"},
                                  headers=bearer(key))

    assert refused.status_code == 503
    assert refused.json() == {"error": "The database is busy with another writer; nothing was"
                                       " changed. Try again shortly"}
    assert int(refused.headers["retry-after"]) > 0
    assert waited < 5, "the configured busy timeout, not the default 10 s"
    assert status.status_code == 200 and status.json()["status"] == "completed"
    # The OpenAI-compatible API says the same in its own shape.
    assert openai.status_code == 503 and int(openai.headers["retry-after"]) > 0
    assert openai.json()["error"]["message"].startswith("The database is busy")
    assert db_state(client.database, account) == before

    # The refused request left no reservation behind: the queue still takes work.
    retry = client.http.post(URL, json={"prompts": ["b", "c"]}, headers=bearer(key))
    assert retry.status_code == 200
    assert client.wait_for_job(key, retry.json()["jobId"])["status"] == "completed"
    assert client.balance(account) == 3 == accounts.ledger_total(client.database.db(), account.id)


class GatedGenerator:
    """Flat images, or an error, once the test opens the gate."""

    def __init__(self, fails: bool):
        self.fails = fails
        self.entered = threading.Event()
        self.gate = threading.Event()

    def generate(self, prompts, seeds, settings):
        self.entered.set()
        assert self.gate.wait(30)
        if self.fails:
            raise RuntimeError("out of memory")
        return [Image.new("RGB", (settings.width, settings.height)) for _ in prompts]


@pytest.mark.parametrize("fails", [False, True], ids=["made", "failed"])
def test_a_batch_ending_while_the_database_is_locked_is_recorded_once_it_frees(
        make_client, make_config, caplog, fails):
    config = make_config(storage={"busy_timeout_seconds": 0.2}, engine={"batch_size": 2})
    generator = GatedGenerator(fails)
    client = make_client(load_generator=lambda: generator, app_config=config)
    account = client.account(credits=3)
    key = client.key(account)
    created = client.http.post(URL, json={"prompts": ["a", "b"]}, headers=bearer(key))
    job_id = created.json()["jobId"]
    assert generator.entered.wait(30)

    with write_lock(config.storage.database):
        generator.gate.set()
        deadline = time.monotonic() + 20
        while "could not record the end of a batch" not in caplog.text:
            assert time.monotonic() < deadline, "the worker never met the locked database"
            time.sleep(0.05)
        still = client.http.get(f"{URL}/{job_id}", headers=bearer(key)).json()
        assert still["status"] == "processing"

    # No restart needed: the end is recorded once the lock is gone, and paid for once.
    job = client.wait_for_job(key, job_id)
    if fails:
        assert (job["status"], job["failedImages"], job["creditsRefunded"]) == ("failed", 2, 2)
        assert client.balance(account) == 3
    else:
        outcome = (job["status"], job["completedImages"], job["creditsRefunded"])
        assert outcome == ("completed", 2, 0)
        assert client.balance(account) == 1
    assert accounts.ledger_total(client.database.db(), account.id) == client.balance(account)


def test_a_full_database_file_gets_503_and_keeps_nothing(make_client, monkeypatch, database):
    # SQLite's max_page_count makes the file "full" for the app's connections:
    # a write that needs one more page fails with SQLITE_FULL, exactly as on a
    # full disk. The test's own connection (`database`) is opened before, uncapped.
    account = accounts.create_account(database.db(), "dev@example.com", "correct horse battery",
                                      accounts.audit.Actor.cli(), credits=500)
    real_open = open_database

    def capped(path, *args, **kwargs):
        db = real_open(path, *args, **kwargs)
        pages = db.execute("PRAGMA page_count").fetchone()[0]
        db.execute(f"PRAGMA max_page_count = {pages}")
        return db

    monkeypatch.setattr(core_database, "open_database", capped)
    client = make_client(load_generator=InstantGenerator)
    key = client.key(account)
    before = db_state(database, account)

    # 100 prompts of 900 characters need many new pages.
    response = client.http.post(URL, json={"prompts": [f"{i} " + "x" * 900 for i in range(100)]},
                                headers=bearer(key))

    assert response.status_code == 503
    assert response.json() == {"error": "The server's disk is full; nothing was changed."
                                        " Try again later"}
    assert int(response.headers["retry-after"]) > 0
    assert db_state(database, account) == before
    assert database.db().execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_nested_transactions_are_all_or_nothing(database):
    db = database.db()
    account = accounts.create_account(db, "dev@example.com", "correct horse battery",
                                      accounts.audit.Actor.cli(), credits=5)
    with pytest.raises(RuntimeError), immediate(db):
        accounts.change_credits(db, account.id, -2, "outer")
        with immediate(db):
            accounts.change_credits(db, account.id, -1, "inner")
        raise RuntimeError("after the inner part committed to the outer transaction")
    assert accounts.get_account(db, account.id).credits == 5
    assert not db.conn.in_transaction

    with immediate(db):
        accounts.change_credits(db, account.id, -2, "outer")
        with pytest.raises(accounts.InsufficientCredits), immediate(db):
            accounts.change_credits(db, account.id, -1, "inner")
            accounts.change_credits(db, account.id, -10, "inner, too much")
    # The inner part was undone alone; the outer part stands.
    balance = accounts.get_account(db, account.id).credits
    assert balance == 3 == accounts.ledger_total(db, account.id)


# A real full disk: a small tmpfs mounted for the test (needs root and a kernel
# that lets this process mount; CI runs as root).

@pytest.fixture
def tiny_disk(tmp_path):
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs",
                              str(mount_point)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def fill(disk: Path) -> Path:
    filler = disk / "filler"
    # Unbuffered, so that each write fails as itself and closing has nothing left to write.
    with open(filler, "wb", buffering=0) as fh:
        for size in (65536, 512):  # then the last few bytes, so not even one page is left
            with contextlib.suppress(OSError):
                while True:
                    fh.write(b"\0" * size)
    return filler


def test_a_full_disk_gets_503_then_works_again_once_space_is_freed(
        make_client, make_config, tiny_disk, tiny_model):
    config = make_config(storage={"data_dir": str(tiny_disk / "data"),
                                  "database": str(tiny_disk / "data" / "appliance.db")})
    database = ConnectionPool(config.storage.database)
    try:
        client = make_client(load_generator=InstantGenerator, app_config=config)
        client.database = database
        account = client.account(credits=500)
        key = client.key(account)
        before = db_state(database, account)
        filler = fill(tiny_disk)
        assert shutil.disk_usage(tiny_disk).free < 4096

        response = client.http.post(URL, headers=bearer(key), json={
            "prompts": [f"{i} " + "x" * 900 for i in range(100)]})

        assert response.status_code == 503, response.text
        assert response.json()["error"] == ("The server's disk is full; nothing was changed."
                                            " Try again later")
        assert int(response.headers["retry-after"]) > 0
        # Reading still works on a full disk.
        assert client.http.get(f"{URL}/{uuid.uuid4()}", headers=bearer(key)).status_code == 404
        filler.unlink()
        assert db_state(database, account) == before
        assert database.db().execute("PRAGMA integrity_check").fetchone()[0] == "ok"

        retry = client.http.post(URL, json={"prompts": ["a", "b"]}, headers=bearer(key))
        assert retry.status_code == 200
        job = client.wait_for_job(key, retry.json()["jobId"])
        assert job["status"] == "completed" and job["completedImages"] == 2
        assert client.balance(account) == 498 == accounts.ledger_total(database.db(), account.id)
    finally:
        database.close()
