"""Cluster mode: real `appliance serve` nodes on one PostgreSQL and one images folder.

Two nodes (A and B) on different ports share the suite's PostgreSQL server (a
database of their own) and an images folder; each is its own process, forked by
the launcher, and dies by SIGKILL like a machine that loses power.
"""

from __future__ import annotations

import collections
import concurrent.futures
import time
from pathlib import Path

import httpx
import psycopg
import pytest

from appliance.accounts import accounts
from appliance.core.database import ConnectionPool
from appliance.core.database_url import DatabaseUrl

from .cli_helpers import invoke
from .console_helpers import CSRF_COOKIE
from .serve_process import ServeProcess, write_config

pytestmark = pytest.mark.system

IMAGES = "/api/playground/images"
PASSWORD = "correct horse battery"
LEASE_SECONDS = 5.0


class Node:
    def __init__(self, name: str, folder: Path, url: str, images: Path, tiny_model: Path,
                 launcher):
        folder.mkdir()
        self.name = name
        self.config = write_config(
            folder, tiny_model,
            storage={"data_dir": str(folder / "data"), "database": url,
                     "images_dir": str(images)},
            cluster={"node_name": name, "lease_seconds": LEASE_SECONDS},
            engine={"batch_size": 4}, generation={"steps": 1},
            limits={"requests_per_minute_per_key": 0, "max_pending_images_per_account": 1000})
        self.process = ServeProcess(self.config, folder / "serve.log", launcher)

    @property
    def url(self) -> str:
        return self.process.url

    def post(self, key: str, prompts: list[str], **extra) -> httpx.Response:
        return httpx.post(f"{self.url}{IMAGES}", json={"prompts": prompts, **extra},
                          headers={"Authorization": f"Bearer {key}"}, timeout=30)

    def job(self, key: str, job_id: str) -> dict:
        response = httpx.get(f"{self.url}{IMAGES}/{job_id}",
                             headers={"Authorization": f"Bearer {key}"}, timeout=30)
        assert response.status_code == 200, response.text
        return response.json()

    def wait_for_job(self, key: str, job_id: str, timeout: float = 90.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = self.job(key, job_id)
            if job["status"] in ("completed", "failed", "cancelled"):
                return job
            time.sleep(0.1)
        raise AssertionError(f"job {job_id} did not end in {timeout} s through {self.name}: {job}")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, tiny_model, launcher, postgres):
    folder = tmp_path_factory.mktemp("cluster")
    url = postgres.new_database()
    images = folder / "shared-images"
    nodes = [Node(name, folder / name, url, images, tiny_model, launcher) for name in ("a", "b")]
    # The first node's init applies the schema; both start at once afterwards.
    for node in nodes:
        node.process.start()
    database = ConnectionPool(DatabaseUrl(url))
    yield nodes, database, url
    for node in nodes:
        node.process.kill()
    database.close()


def account_with_key(config: Path, email: str, credits: int) -> str:
    """An account and key made with node A's `appliance` commands; the key, printed once."""
    made = invoke(config, "accounts", "create", email, "--credits", str(credits),
                  "--password-stdin", stdin=PASSWORD + "\n")
    assert made.exit_code == 0, made.output
    created = invoke(config, "keys", "create", email, "--name", "cluster test")
    assert created.exit_code == 0, created.output
    return created.output.strip().splitlines()[-1]


def test_a_key_made_on_one_node_works_on_every_node_and_a_deleted_one_on_none(cluster):
    (a, b), _, _ = cluster
    key = account_with_key(a.config, "keys@example.com", credits=5)
    for node in (a, b):
        assert httpx.get(f"{node.url}/api/models", headers={"Authorization": f"Bearer {key}"},
                         timeout=30).status_code == 200
    deleted = invoke(b.config, "keys", "delete", "keys@example.com", key[:12])
    assert deleted.exit_code == 0, deleted.output
    for node in (a, b):
        refused = httpx.get(f"{node.url}/api/models", timeout=30,
                            headers={"Authorization": f"Bearer {key}"})
        assert (refused.status_code, refused.json()) == (401, {"error": "Invalid API key"})


def test_concurrent_spends_on_both_nodes_never_overdraw_nor_lose_a_credit(cluster):
    (a, b), database, _ = cluster
    key = account_with_key(a.config, "spender@example.com", credits=100)

    def spend(n: int) -> int:
        return (a, b)[n % 2].post(key, [f"spend {n}"]).status_code

    with concurrent.futures.ThreadPoolExecutor(max_workers=32) as pool:
        statuses = collections.Counter(pool.map(spend, range(200)))

    assert statuses == {200: 100, 402: 100}
    db = database.db()
    account = accounts.find_account(db, "spender@example.com")
    assert account.credits == 0
    assert accounts.ledger_total(db, account.id) == 0
    charges = db.execute("SELECT COUNT(*), SUM(delta) FROM credit_ledger WHERE account_id = ?"
                         " AND job_id IS NOT NULL", [account.id]).fetchone()
    assert charges == (100, -100)


def test_a_job_sent_to_one_node_is_made_by_both_and_read_whole_through_the_other(cluster):
    (a, b), database, _ = cluster
    key = account_with_key(a.config, "bulk@example.com", credits=60)
    submitted = a.post(key, [f"picture {n}" for n in range(60)])
    assert submitted.status_code == 200, submitted.text
    job_id = submitted.json()["jobId"]

    job = b.wait_for_job(key, job_id)

    assert job["status"] == "completed" and job["completedImages"] == 60
    made_by = collections.Counter(row[0] for row in database.db().execute(
        "SELECT made_by FROM job_images WHERE job_id = ?", [job_id]))
    assert set(made_by) == {"a", "b"}, made_by
    # Any node serves any image from the shared folder.
    for node in (a, b):
        png = httpx.get(job["images"][59]["url"].replace(a.url, node.url).replace(b.url, node.url),
                        headers={"Authorization": f"Bearer {key}"}, timeout=30)
        assert png.status_code == 200 and png.content.startswith(b"\x89PNG")


def test_a_killed_nodes_claimed_images_are_made_by_another_after_the_lease(cluster):
    (a, b), database, _ = cluster
    key = account_with_key(a.config, "survivor@example.com", credits=40)
    submitted = a.post(key, [f"survive {n}" for n in range(40)])
    job_id = submitted.json()["jobId"]
    db = database.db()

    # Killed while it holds claimed images not yet made.
    deadline = time.monotonic() + 30
    while not db.execute("SELECT COUNT(*) FROM job_images WHERE job_id = ? AND claimed_by = 'a'"
                         " AND status IN ('queued', 'running')", [job_id]).fetchone()[0]:
        assert time.monotonic() < deadline, "node a never claimed an image"
        time.sleep(0.01)
    a.process.kill()
    held = [row[0] for row in db.execute(
        "SELECT idx FROM job_images WHERE job_id = ? AND claimed_by = 'a'"
        " AND status IN ('queued', 'running')", [job_id])]

    job = b.wait_for_job(key, job_id)

    assert job["status"] == "completed" and job["completedImages"] == 40
    made = dict(db.execute("SELECT idx, made_by FROM job_images WHERE job_id = ?", [job_id])
                .fetchall())
    assert held and all(made[idx] == "b" for idx in held)

    # Back again: nothing it held is made or recorded twice.
    a.process.start()
    time.sleep(1.0)
    assert b.job(key, job_id) == job
    account = accounts.find_account(db, "survivor@example.com")
    ledger = db.execute("SELECT COUNT(*), SUM(delta) FROM credit_ledger WHERE account_id = ?",
                        [account.id]).fetchone()
    assert ledger == (2, 0)  # the grant and the one charge; no refund
    assert account.credits == 0


def test_while_the_database_restarts_requests_get_503_and_nothing_is_lost(cluster, postgres):
    (a, b), database, _ = cluster
    key = account_with_key(a.config, "outage@example.com", credits=30)
    before = b.post(key, [f"before {n}" for n in range(20)]).json()["jobId"]

    postgres.stop_server()
    try:
        for node in (a, b):
            refused = node.post(key, ["during"])
            assert refused.status_code == 503, refused.text
            assert refused.headers["Retry-After"] == "5"
            assert "database" in refused.json()["error"]
            assert httpx.get(f"{node.url}/readyz", timeout=30).status_code == 503
        time.sleep(2.0)
    finally:
        postgres.start_server()

    for node in (a, b):
        deadline = time.monotonic() + 30
        while httpx.get(f"{node.url}/readyz", timeout=30).status_code != 200:
            assert time.monotonic() < deadline, f"{node.name} did not become ready again"
            time.sleep(0.2)
    after = a.post(key, [f"after {n}" for n in range(10)])
    assert after.status_code == 200, after.text

    for job_id, count in ((before, 20), (after.json()["jobId"], 10)):
        job = a.wait_for_job(key, job_id)
        assert job["status"] == "completed" and job["completedImages"] == count
    db = database.db()
    account = accounts.find_account(db, "outage@example.com")
    assert account.credits == 0 and accounts.ledger_total(db, account.id) == 0


def test_nodes_record_their_heartbeat_and_the_cluster_command_lists_them(cluster):
    (a, b), _, url = cluster
    status = invoke(a.config, "cluster", "status")
    assert status.exit_code == 0, status.output
    lines = status.output.splitlines()
    assert any(line.split()[0] == "a" for line in lines[1:] if line.strip())
    assert any(line.split()[0] == "b" for line in lines[1:] if line.strip())
    assert "queued" in status.output
    # Every quarter lease, and again within seconds of the database's restart above.
    deadline = time.monotonic() + 2 * LEASE_SECONDS
    while True:
        with psycopg.connect(url) as conn:
            ages = dict(conn.execute("SELECT name, extract(epoch from clock_timestamp())"
                                     " - heartbeat_at FROM nodes").fetchall())
        if max(ages.values()) < LEASE_SECONDS / 2 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert set(ages) == {"a", "b"}
    assert max(ages.values()) < LEASE_SECONDS / 2, ages
    metrics = httpx.get(f"{b.url}/metrics", timeout=30).text
    for node in ("a", "b"):
        for name in ("heartbeat_age_seconds", "images_last_minute", "claimed_images"):
            assert f'appliance_cluster_node_{name}{{node="{node}"}}' in metrics
    assert "appliance_queue_depth 0.0" in metrics  # the cluster's queue, not b's own


def test_a_console_sign_in_on_one_node_holds_on_the_other_and_its_forms_are_taken(cluster):
    (a, b), _, _ = cluster
    account_with_key(a.config, "console@example.com", credits=1)
    # One browser: cookies belong to the host, whichever node's port answered.
    with httpx.Client(timeout=30) as browser:
        browser.get(f"{a.url}/login")
        signed_in = browser.post(f"{a.url}/login", follow_redirects=False, data={
            "email": "console@example.com", "password": PASSWORD,
            "_csrf_token": browser.cookies[CSRF_COOKIE]})
        assert signed_in.status_code == 303, signed_in.text
        page = browser.get(f"{b.url}/console/api-keys")
        assert page.status_code == 200 and "console@example.com" in page.text
        made = browser.post(f"{b.url}/console/api-keys", follow_redirects=False, data={
            "name": "made on b", "_csrf_token": browser.cookies[CSRF_COOKIE]})
        assert made.status_code < 400, made.text
        listed = invoke(a.config, "keys", "list", "console@example.com")
        assert "made on b" in listed.output
        signed_out = browser.post(f"{b.url}/logout", follow_redirects=False,
                                  data={"_csrf_token": browser.cookies[CSRF_COOKIE]})
        assert signed_out.status_code == 303
        # Signed out on every node (a client that asks for no HTML gets 401, not a redirect).
        assert browser.get(f"{a.url}/console/api-keys").status_code == 401


def test_a_retry_to_another_node_replays_and_a_job_is_followed_and_cancelled_anywhere(cluster):
    (a, b), database, _ = cluster
    key = account_with_key(a.config, "retry@example.com", credits=300)
    headers = {"Idempotency-Key": "nightly-42"}
    sent = httpx.post(f"{a.url}{IMAGES}", json={"prompts": ["kept"]}, timeout=30,
                      headers={"Authorization": f"Bearer {key}", **headers})
    again = httpx.post(f"{b.url}{IMAGES}", json={"prompts": ["kept"]}, timeout=30,
                       headers={"Authorization": f"Bearer {key}", **headers})
    assert sent.status_code == again.status_code == 200
    assert again.json() == sent.json()

    # Followed live through the other node, to its end.
    job_id = sent.json()["jobId"]
    with httpx.stream("GET", f"{b.url}{IMAGES}/{job_id}/events", timeout=60,
                      headers={"Authorization": f"Bearer {key}"}) as events:
        text = "".join(events.iter_text())
    assert "event: end" in text and '"status":"completed"' in text

    # A long job sent to one node is cancelled through the other; what had not started
    # is refunded once.
    long_job = a.post(key, [f"long {n}" for n in range(100)]).json()["jobId"]
    cancelled = httpx.delete(f"{b.url}{IMAGES}/{long_job}", timeout=30,
                             headers={"Authorization": f"Bearer {key}"})
    assert cancelled.status_code == 200, cancelled.text
    job = b.wait_for_job(key, long_job)
    assert job["status"] in ("cancelled", "completed")
    assert job["cancelledImages"] > 0
    assert job["creditsRefunded"] == job["cancelledImages"]
    db = database.db()
    account = accounts.find_account(db, "retry@example.com")
    assert accounts.ledger_total(db, account.id) == account.credits
    charged = db.execute("SELECT COUNT(*) FROM credit_ledger WHERE job_id = ? AND delta < 0",
                         [job_id]).fetchone()[0]
    assert charged == 1  # the retry through b charged nothing
