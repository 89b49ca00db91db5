"""No raw API key, password or session id is kept in the database, the data folder or the logs."""

from __future__ import annotations

import hashlib
import re
import secrets
import time

import httpx
import pytest

from appliance.accounts import keys

from .secret_watch import leaks, watched
from .serve_process import ServeProcess, cli, write_config

URL = "/api/playground/images"
CSRF_FIELD = re.compile(r'name="_csrf_token" value="([^"]+)"')
KEY = re.compile(r"wi_live_[0-9a-f]{64}")


def files_holding(folder, needle: bytes) -> list[str]:
    return [str(p) for p in sorted(folder.rglob("*")) if p.is_file() and needle in p.read_bytes()]


@pytest.mark.system
def test_a_full_cli_api_and_console_run_keeps_no_secret(tmp_path, tiny_model, launcher):
    config = write_config(tmp_path, tiny_model)
    email, password = "owner@example.com", "pw-" + secrets.token_hex(12)

    created = cli(config, "accounts", "create", email, "--credits", "5", "--password-stdin",
                  stdin=password + "\n")
    assert "created user account" in created
    key = cli(config, "keys", "create", email, "--name", "CLI").splitlines()[-1]
    assert KEY.fullmatch(key)
    server = ServeProcess(config, tmp_path / "serve.log", launcher).start()
    try:
        with httpx.Client(base_url=server.url, timeout=30) as api:
            headers = {"Authorization": f"Bearer {key}", "Idempotency-Key": "run-1"}
            created = api.post(URL, json={"prompts": ["a lighthouse"]}, headers=headers)
            job_id = created.json()["jobId"]
            deadline = time.monotonic() + 60
            while (job := api.get(f"{URL}/{job_id}", headers=headers).json())["status"] \
                    != "completed":
                assert time.monotonic() < deadline, job
                time.sleep(0.1)
            assert api.get(job["images"][0]["url"], headers=headers).status_code == 200

        with httpx.Client(base_url=server.url, timeout=30) as browser:
            token = CSRF_FIELD.search(browser.get("/login").text)[1]
            signed_in = browser.post("/login", data={"email": email, "password": password,
                                                     "_csrf_token": token})
            assert signed_in.status_code in (200, 303), signed_in.text
            session_id = next(c.value for c in browser.cookies.jar if "csrf" not in c.name)
            keys_page = browser.get("/console/api-keys")
            token = CSRF_FIELD.search(keys_page.text)[1]
            made = browser.post("/console/api-keys", data={"name": "Console", "_csrf_token": token})
            console_key = KEY.search(made.text)[0]
            assert console_key != key
            browser.post("/logout", data={"_csrf_token": CSRF_FIELD.search(made.text)[1]})
        cli(config, "keys", "list", email)
        cli(config, "keys", "delete", email, key[:12], "--name", "CLI")
    finally:
        server.stop()

    data_folder, log = tmp_path / "data", tmp_path / "serve.log"
    secret_values = {"the CLI's key": key, "its 64 hex characters": key[8:],
                     "the console's key": console_key, "the password": password,
                     "the session id": session_id}
    for what, value in secret_values.items():
        assert len(value) >= 20
        for place in (data_folder, log):
            found = files_holding(place, value.encode()) if place.is_dir() else (
                [str(place)] if value.encode() in place.read_bytes() else [])
            assert not found, f"{what} is kept in {found}"
    # The search does find what is there: the digests that stand for the key and the session.
    assert files_holding(data_folder, hashlib.sha256(key.encode()).hexdigest().encode())
    assert "Application startup complete" in log.read_text(), "the log was written"


@pytest.mark.sqlite_only
def test_keys_are_found_by_digest_through_the_index(database):
    from appliance.accounts import accounts, audit

    db = database.db()
    account = accounts.create_account(db, "dev@example.com", "correct horse battery",
                                      audit.Actor.cli())
    info, raw = keys.create_key(db, account.id, "Production", audit.Actor.cli())
    row = db.execute("SELECT * FROM api_keys WHERE id = ?", [info.id]).fetchone()
    assert raw not in repr(row) and raw[8:] not in repr(row)
    assert keys.hash_key(raw) in row
    # The lookup is one indexed equality on the digest, done by SQLite, never a
    # loop comparing secrets in Python.
    plan = " ".join(str(r) for r in db.execute(
        "EXPLAIN QUERY PLAN SELECT id FROM api_keys WHERE key_hash = ?", [keys.hash_key(raw)]))
    assert "INDEX" in plan and "(key_hash=?)" in plan, plan
    assert keys.find_owner(db, raw).key_id == info.id


def test_the_suite_watches_the_keys_and_passwords_it_makes(client):
    # What the end-of-run search (secret_watch.py) looks for: every key and password
    # made in this process.
    account = client.account(credits=1)
    key = client.key(account)
    assert key in watched.keys and "correct horse battery" in watched.passwords


def test_the_leak_search_finds_a_planted_key_and_password(tmp_path):
    # Made by hand, not by keys.generate_key: the end-of-suite search would rightly find it.
    key = keys.KEY_PREFIX + secrets.token_hex(32)
    (tmp_path / "clean.db").write_bytes(b"\x00" + hashlib.sha256(key.encode()).hexdigest().encode())
    assert leaks(tmp_path, {key}, {"hunter2-password"}) == []
    (tmp_path / "nested").mkdir()
    (tmp_path / "nested" / "app.log").write_bytes(b"\x00\x01 token=" + key[8:].encode() + b"\n")
    (tmp_path / "notes.txt").write_text("password: hunter2-password")
    assert leaks(tmp_path, {key}, {"hunter2-password"}) == [
        f"an API key in {tmp_path / 'nested' / 'app.log'}",
        f"a password in {tmp_path / 'notes.txt'}",
    ]
