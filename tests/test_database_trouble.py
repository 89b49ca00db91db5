"""A locked or full database: 503 with Retry-After, never a partial charge or a half-made job."""

from __future__ import annotations

import contextlib
import gc
import os
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

import appliance.core.database as core_database
from appliance.accounts import accounts, keys
from appliance.cli.main import cli
from appliance.core.clock import utc_clock, utc_iso
from appliance.core.config import load_config
from appliance.core.database import ConnectionPool, immediate, open_database
from appliance.ops.doctor import PROBLEM, check_database
from appliance.web.console.sessions import RENEW_STEP

from .console_helpers import HTML, csrf, sign_in
from .helpers import InstantGenerator, bearer, count_rows

# SQLite's locks, its busy timeout and a full file.
pytestmark = pytest.mark.sqlite_only

URL = "/api/playground/images"


def db_state(database, account) -> tuple:
    db = database.db()
    return (accounts.get_account(db, account.id).credits, accounts.ledger_total(db, account.id),
            count_rows(db, "jobs"), count_rows(db, "job_images"), count_rows(db, "credit_ledger"))


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


# Reads while writes wait: another process holding the write lock makes the charging
# writes wait (up to the busy timeout), never a read.

def with_a_finished_job(make_client, make_config, busy_timeout_seconds: float):
    """A client, its config, an account with 100 credits, its key and a finished job's id."""
    config = make_config(storage={"busy_timeout_seconds": busy_timeout_seconds})
    client = make_client(load_generator=InstantGenerator, app_config=config)
    account = client.account(credits=100)
    key = client.key(account)
    done = client.http.post(URL, json={"prompts": ["a"]}, headers=bearer(key)).json()["jobId"]
    client.wait_for_job(key, done)
    return client, config, account, key, done


def test_reads_answer_at_once_while_many_writes_wait_for_a_locked_database(make_client,
                                                                           make_config):
    # The writes wait longer than the lock is held: none gives up, all wait.
    client, config, account, key, done = with_a_finished_job(make_client, make_config, 10)
    # A key never used yet: its first request is the one that records its last use.
    fresh = client.key(account, "fresh")
    # A console page is a sync handler: it needs one of the threads the writes wait in.
    assert sign_in(client.http, account.email).status_code == 303
    before = db_state(client.database, account)

    with ThreadPoolExecutor(32) as pool:
        with write_lock(config.storage.database):
            locked_at = time.monotonic()
            posts = [pool.submit(client.http.post, URL, json={"prompts": ["b"]},
                                 headers=bearer(key)) for _ in range(32)]
            time.sleep(0.1)  # they now wait for the lock and hold every request thread
            timings = {}
            for name, path, headers in [("job", f"{URL}/{done}", bearer(fresh)),
                                        ("image", f"{URL}/{done}/images/0", bearer(key)),
                                        ("readyz", "/readyz", {}), ("metrics", "/metrics", {}),
                                        ("console", "/console/api-keys", HTML)]:
                started = time.monotonic()
                response = client.http.get(path, headers=headers)
                timings[name] = (response.status_code, time.monotonic() - started)
            # Held long enough that a read waiting for the lock would miss the bound below.
            time.sleep(max(0.0, locked_at + 1.5 - time.monotonic()))
            waiting = sum(not post.done() for post in posts)
        answers = [post.result() for post in posts]

    for name, (status, seconds) in timings.items():
        assert status == 200 and seconds < 1.0, (name, status, seconds)
    assert waiting == 32, "a write finished while the lock was held"
    assert [answer.status_code for answer in answers] == [200] * 32
    # Each charged once, once the lock was gone.
    credits, ledger, jobs = db_state(client.database, account)[:3]
    assert (credits, ledger, jobs) == (before[0] - 32, before[1] - 32, before[2] + 32)
    # The fresh key's use is recorded too, after the lock.
    assert client.services.keys.uses.wait(10)
    assert keys.list_keys(client.database.db(), account.id)[1].last_used_at is not None


def test_writes_past_their_turn_get_503_and_keep_nothing_while_reads_go_on(make_client,
                                                                          make_config):
    client, config, account, key, _ = with_a_finished_job(make_client, make_config, 0.5)
    assert sign_in(client.http, account.email).status_code == 303
    before = db_state(client.database, account)

    with ThreadPoolExecutor(24) as pool, write_lock(config.storage.database):
        started = time.monotonic()
        posts = [pool.submit(client.http.post, URL, json={"prompts": ["b"]},
                             headers=bearer(key)) for _ in range(16)]
        token = csrf(client.http)
        forms = [pool.submit(client.http.post, "/console/api-keys", headers=HTML,
                             data={"name": f"k{n}", "_csrf_token": token}) for n in range(4)]
        time.sleep(0.1)
        page = client.http.get("/console/api-keys", headers=HTML)
        page_seconds = time.monotonic() - started
        answers = [post.result() for post in posts]
        form_answers = [form.result() for form in forms]
        all_answered = time.monotonic() - started

    assert page.status_code == 200 and page_seconds < 1.0
    # Each waited at most the busy timeout for its turn, then the busy timeout for the
    # lock: refused in about one or two busy timeouts, never held for the lock's whole life.
    assert all_answered < 1.5 * 2 + 1
    for answer in answers:
        assert answer.status_code == 503, answer.text
        assert answer.json()["error"].startswith("The database is busy with another writer")
        assert answer.headers["retry-after"] == "5"
    # The console's forms get the console's page, not JSON.
    assert [form.status_code for form in form_answers] == [503] * 4
    assert all("text/html" in form.headers["content-type"] for form in form_answers)
    assert db_state(client.database, account) == before
    assert len(keys.list_keys(client.database.db(), account.id)) == 1


def test_a_console_form_refused_by_the_lock_gets_the_503_page(make_client, make_config):
    client, config, account, _, _ = with_a_finished_job(make_client, make_config, 0.3)
    assert sign_in(client.http, account.email).status_code == 303
    token = csrf(client.http)
    with write_lock(config.storage.database):
        # Its turn is free at once: the handler's own write meets the lock.
        refused = client.http.post("/console/api-keys", headers=HTML,
                                   data={"name": "late", "_csrf_token": token})
    assert refused.status_code == 503 and refused.headers["retry-after"] == "5"
    assert "text/html" in refused.headers["content-type"]
    assert "The database is busy with another writer" in refused.text
    assert len(keys.list_keys(client.database.db(), account.id)) == 1


def test_a_console_page_never_waits_for_the_lock_to_renew_its_sign_in(make_client,
                                                                     make_config):
    client, config, account, _, _ = with_a_finished_job(make_client, make_config, 3)
    assert sign_in(client.http, account.email).status_code == 303
    db = client.database.db()
    # A sign-in whose expiry is due to be pushed back: its last push is two steps old.
    idle = timedelta(minutes=config.console.idle_timeout_minutes)
    due = utc_iso(utc_clock() + idle - 2 * RENEW_STEP)
    with immediate(db):
        db.execute("UPDATE console_sessions SET expires_at = ?", [due])

    with write_lock(config.storage.database):
        started = time.monotonic()
        page = client.http.get("/console/api-keys", headers=HTML)
        seconds = time.monotonic() - started
    assert page.status_code == 200 and seconds < 1.0, seconds
    assert db.execute("SELECT expires_at FROM console_sessions").fetchone()[0] == due
    # The renewal missed under the lock is made by the next request.
    assert client.http.get("/console/api-keys", headers=HTML).status_code == 200
    assert db.execute("SELECT expires_at FROM console_sessions").fetchone()[0] > due


def test_readyz_fails_once_writes_are_refused_longer_than_the_busy_timeout(make_client,
                                                                          make_config):
    config = make_config(storage={"busy_timeout_seconds": 0.3})
    client = make_client(load_generator=InstantGenerator, app_config=config)
    assert client.http.get("/readyz").status_code == 200

    with write_lock(config.storage.database):
        # A lock held for a moment is an ordinary writer: still ready.
        first = client.http.get("/readyz")
        time.sleep(0.4)
        started = time.monotonic()
        refused = client.http.get("/readyz")
        seconds = time.monotonic() - started

    assert first.status_code == 200
    assert refused.status_code == 503 and seconds < 1.0
    assert int(refused.headers["retry-after"]) > 0
    database = refused.json()["checks"]["database"]
    assert database.startswith(f"{config.storage.database} has refused writes for")
    assert "write lock" in database and database in refused.json()["error"]
    assert client.http.get("/readyz").json() == {"status": "ready", "checks": {
        "database": "ok", "disk": "ok", "model": "ok", "worker": "ok"},
        "models_loaded": {"engine-worker": ["tiny"]}}


def test_readyz_fails_below_the_free_disk_space_and_recovers(make_client, make_config,
                                                             tmp_path):
    mib = 1024 * 1024
    free = shutil.disk_usage(tmp_path).free // mib
    if free < 1024:
        pytest.skip(f"only {free} MiB free: too little to lower by a few hundred")
    # Room for what other programs write meanwhile on either side of the threshold.
    config = make_config(health={"min_free_disk_mb": free - 128})
    client = make_client(load_generator=InstantGenerator, app_config=config)
    assert client.http.get("/readyz").status_code == 200

    filler = tmp_path / "filler"
    with open(filler, "wb") as fh:
        os.posix_fallocate(fh.fileno(), 0, 384 * mib)
    try:
        full = client.http.get("/readyz")
    finally:
        filler.unlink()

    assert full.status_code == 503
    disk = full.json()["checks"]["disk"]
    assert disk.startswith(f"the disk of {config.storage.data_dir} is (nearly) full:")
    assert f"below health.min_free_disk_mb ({free - 128})" in disk
    assert client.http.get("/readyz").status_code == 200


def test_a_thread_that_ends_takes_its_connection_with_it(database):
    # The request thread pools end idle threads all day: their connections must not pile up.
    def open_files() -> int:
        target = os.path.realpath(database.path)
        return sum(os.path.realpath(f"/proc/self/fd/{fd}") == target
                   for fd in os.listdir("/proc/self/fd"))

    def use_on_a_thread_of_its_own() -> None:
        thread = threading.Thread(target=lambda: database.db().execute(
            "SELECT COUNT(*) FROM accounts").fetchone())
        thread.start()
        thread.join()
        # The young generations only: what a connection left behind is new, and a full
        # collection in a process that loaded torch takes a third of a second.
        gc.collect(1)

    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("needs /proc to count open files")
    for _ in range(5):
        use_on_a_thread_of_its_own()
    after_a_few = open_files()
    for _ in range(20):
        use_on_a_thread_of_its_own()
    # (SQLite keeps a closed connection's descriptor for the next one to reuse.)
    assert open_files() == after_a_few


# A database the commands cannot use: one line naming the file and what to do.

@pytest.fixture
def broken_config(tmp_path, root_handlers_restored) -> Path:
    path = tmp_path / "config.toml"
    path.write_text('[storage]\ndata_dir = "state"\ndatabase = "state/app.db"\n')
    (tmp_path / "state").mkdir()
    # Not a database at all: what a disk error or a stray copy leaves.
    (tmp_path / "state" / "app.db").write_bytes(b"this is no SQLite file\n" * 400)
    return path


@pytest.mark.parametrize("args", [
    ["init"], ["serve"], ["credits", "grant", "dev@example.com", "5"],
    ["keys", "list", "dev@example.com"], ["backup", "copy"],
], ids=lambda args: args[0])
def test_a_corrupted_database_stops_every_command_with_one_line(broken_config, args):
    result = CliRunner().invoke(cli, [*args, "--config", str(broken_config)])
    database = broken_config.parent / "state" / "app.db"
    assert result.exit_code == 1, result.output
    assert result.stderr == (
        f"appliance: {database} is not a SQLite database (file is not a database): restore it"
        " from a backup (appliance restore BACKUP) or move it away and run appliance init\n")
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_doctor_names_a_corrupted_database(broken_config):
    config = load_config(broken_config)
    findings = list(check_database(config))
    assert [(f.level, f.area) for f in findings] == [(PROBLEM, "database")]
    assert findings[0].text.startswith(f"{config.storage.database} is not a SQLite database")


# Root reads a file whatever its mode; without these two capabilities it is held to the
# modes like any user, which lets the test run where it runs as root.
AS_AN_ORDINARY_USER = ["setpriv", "--bounding-set=-dac_override,-dac_read_search",
                       "--inh-caps=-dac_override,-dac_read_search"]


def held_to_file_modes() -> list[str]:
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None or subprocess.run(
            [*AS_AN_ORDINARY_USER, "true"], capture_output=True).returncode != 0:
        pytest.skip("running as root, and cannot drop the capabilities that ignore file modes")
    return AS_AN_ORDINARY_USER


@pytest.mark.system
@pytest.mark.parametrize("damage", ["garbage", "unreadable"])
def test_serve_on_a_database_it_cannot_use_says_so_in_one_line(tmp_path, damage):
    config = tmp_path / "config.toml"
    config.write_text('[storage]\ndata_dir = "state"\ndatabase = "state/app.db"\n'
                      '[model]\npath = "models/none"\n')
    database = tmp_path / "state" / "app.db"
    prefix: list[str] = []
    if damage == "garbage":
        database.parent.mkdir()
        database.write_bytes(b"this is no SQLite file\n" * 400)
        advice = "is not a SQLite database (file is not a database): restore it from a backup"
    else:
        ConnectionPool(database).close()
        database.chmod(0o000)
        prefix = held_to_file_modes()
        advice = "cannot be opened for reading and writing (unable to open database file)"

    result = subprocess.run([*prefix, sys.executable, "-m", "appliance", "serve", "--config",
                             str(config)], capture_output=True, text=True, timeout=120)

    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.startswith(f"appliance: {database} {advice}")
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
