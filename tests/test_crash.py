"""SIGKILL a real `appliance serve` at random moments: nothing lost, nothing charged twice.

Each round starts the server (which re-queues what the last one left), has a few
clients submit jobs while the worker generates and writes PNGs, then kills the
process without warning at a moment it watches for: while requests are being
charged, while images are generating (after a random delay), or just as a PNG
file appears on disk. Then it checks the books on the database left behind. A
last start must finish every job.
"""

from __future__ import annotations

import io
import random
import sqlite3
import threading
import time
from pathlib import Path

import httpx
import pytest
from PIL import Image

from appliance.accounts import accounts, audit, keys
from appliance.core.database import ConnectionPool

from .serve_process import ServeProcess, write_config

pytestmark = pytest.mark.system

URL = "/api/playground/images"
MOMENT_TIMEOUT = 20.0  # a round whose moment never comes is killed anyway
CLIENTS = 2
JOBS_PER_CLIENT_PER_ROUND = 2
CREDITS = 10_000
SETTLE_TIMEOUT = 120.0


class Submitter(threading.Thread):
    """Submits small jobs until stopped or the server goes away; remembers what was accepted."""

    def __init__(self, url: str, key: str, rng: random.Random, accepted: dict[str, int]):
        super().__init__(daemon=True)
        self.url, self.key, self.accepted = url, key, accepted
        self.sizes = [rng.randint(1, 2) for _ in range(JOBS_PER_CLIENT_PER_ROUND)]
        self.in_flight = threading.Event()
        self.cut_off = False  # the kill came while a request was in flight
        self.stopping = threading.Event()

    def run(self) -> None:
        with httpx.Client(timeout=30) as client:
            for size in self.sizes:
                if self.stopping.is_set():
                    return
                prompts = [f"crash test image {i}" for i in range(size)]
                self.in_flight.set()
                try:
                    response = client.post(self.url + URL, json={"prompts": prompts},
                                           headers={"Authorization": f"Bearer {self.key}"})
                except httpx.TransportError:
                    self.cut_off = True
                    return
                self.in_flight.clear()
                assert response.status_code == 200, response.text
                self.accepted[response.json()["jobId"]] = size
                self.stopping.wait(0.05)


# Each waits for its moment (or gives up at the deadline) and says what it saw.

def while_charging(rng, submitters, db_path, images_dir, deadline) -> str:
    while not any(s.in_flight.is_set() for s in submitters) and time.monotonic() < deadline:
        time.sleep(0.001)
    time.sleep(rng.uniform(0, 0.02))
    return "requests in flight"


def while_generating(rng, submitters, db_path, images_dir, deadline) -> str:
    while time.monotonic() < deadline:
        with sqlite3.connect(db_path) as conn:
            if conn.execute("SELECT 1 FROM job_images WHERE status = 'running'").fetchone():
                break
        time.sleep(0.01)
    time.sleep(rng.uniform(0, 0.3))
    return "images running"


def while_writing(rng, submitters, db_path, images_dir, deadline) -> str:
    before = set(_files(images_dir))
    while time.monotonic() < deadline:
        new = set(_files(images_dir)) - before
        if new:
            return f"just written: {sorted(p.name for p in new)}"
        time.sleep(0.001)
    return "nothing written before the deadline"


def _files(folder: Path) -> list[Path]:
    return [path for path in folder.rglob("*") if path.is_file()] if folder.exists() else []


MOMENTS = [while_charging, while_generating, while_writing] * 2


def check_books(db_path: Path, images_dir: Path, account_id: int,
                accepted: dict[str, int], settled: bool) -> dict[str, int]:
    """The invariants that must hold whenever the process is gone; returns image counts."""
    conn = sqlite3.connect(db_path)
    conn.row_factory = sqlite3.Row
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        balance = conn.execute("SELECT credits FROM accounts WHERE id = ?",
                               [account_id]).fetchone()[0]
        ledger = conn.execute("SELECT SUM(delta), MIN(balance_after) FROM credit_ledger"
                              " WHERE account_id = ?", [account_id]).fetchone()
        assert balance == ledger[0] and ledger[1] >= 0, "balance and ledger agree"
        jobs = {row["id"]: row for row in conn.execute("SELECT * FROM jobs")}
        for job_id, size in accepted.items():
            assert job_id in jobs, "an accepted job is kept"
            assert jobs[job_id]["total_images"] == size
        counts = {"queued": 0, "running": 0, "completed": 0, "failed": 0, "cancelled": 0}
        paid = 0
        for job_id, job in jobs.items():
            images = conn.execute("SELECT idx, status, file FROM job_images WHERE job_id = ?"
                                  " ORDER BY idx", [job_id]).fetchall()
            statuses = [image["status"] for image in images]
            assert len(images) == job["total_images"] == job["credits_used"], "no half-made job"
            assert [image["idx"] for image in images] == list(range(len(images)))
            refunded = statuses.count("failed") + statuses.count("cancelled")
            assert job["credits_refunded"] == refunded, "every failed image is refunded, once"
            charged = conn.execute("SELECT SUM(delta) FROM credit_ledger WHERE job_id = ?",
                                   [job_id]).fetchone()[0]
            assert charged == refunded - job["credits_used"], "the job was charged exactly once"
            unfinished = statuses.count("queued") + statuses.count("running")
            if job["status"] in ("completed", "failed", "cancelled"):
                assert unfinished == 0, "a finished job has no unfinished image"
            if settled:
                assert unfinished == 0, f"job {job_id} is stuck: {statuses}"
            for image in images:
                counts[image["status"]] += 1
                if image["status"] == "completed":
                    assert_whole_png((images_dir / image["file"]).read_bytes())
            paid += job["credits_used"] - job["credits_refunded"]
        assert balance == CREDITS - paid, "the balance is what was paid for, no more, no less"
        return counts
    finally:
        conn.close()


def assert_whole_png(data: bytes) -> None:
    image = Image.open(io.BytesIO(data))
    image.load()  # decodes every row: a truncated file fails here
    assert image.size == (64, 64)


def wait_until_settled(db_path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with sqlite3.connect(db_path) as conn:
            open_images = conn.execute("SELECT COUNT(*) FROM job_images"
                                       " WHERE status IN ('queued', 'running')").fetchone()[0]
        if not open_images:
            return
        assert time.monotonic() < deadline, f"{open_images} images still unfinished: stuck"
        time.sleep(0.25)


def test_sigkill_at_random_moments_loses_nothing_and_charges_nothing_twice(
        tmp_path, tiny_model, launcher):
    rng = random.Random()
    # Small batches, so that some end (and write their PNGs) between the kills.
    config = write_config(tmp_path, tiny_model, engine={"batch_size": 2})
    db_path, images_dir = tmp_path / "data" / "appliance.db", tmp_path / "data" / "images"
    database = ConnectionPool(db_path)
    account = accounts.create_account(database.db(), "crash@example.com", "correct horse battery",
                                      audit.Actor.cli(), credits=CREDITS)
    key = keys.create_key(database.db(), account.id, "Crash", audit.Actor.cli())[1]
    database.close()
    server = ServeProcess(config, tmp_path / "serve.log", launcher)
    accepted: dict[str, int] = {}
    rounds = []

    try:
        for moment in MOMENTS:
            server.start()
            submitters = [Submitter(server.url, key, rng, accepted) for _ in range(CLIENTS)]
            for submitter in submitters:
                submitter.start()
            seen = moment(rng, submitters, db_path, images_dir, time.monotonic() + MOMENT_TIMEOUT)
            server.kill()
            for submitter in submitters:
                submitter.stopping.set()
                submitter.join(30)
            counts = check_books(db_path, images_dir, account.id, accepted, settled=False)
            rounds.append(f"{moment.__name__} ({seen}; {sum(s.cut_off for s in submitters)}"
                          f" requests cut off, {counts['running']} images left running)")

        server.start()
        wait_until_settled(db_path, SETTLE_TIMEOUT)
        counts = check_books(db_path, images_dir, account.id, accepted, settled=True)
        # What the owner is served is whole, too.
        with httpx.Client(timeout=30, headers={"Authorization": f"Bearer {key}"}) as client:
            for job_id in accepted:
                job = client.get(f"{server.url}{URL}/{job_id}").json()
                assert job["status"] in ("completed", "failed"), job
                for image in job["images"]:
                    if image["status"] == "completed":
                        assert_whole_png(client.get(image["url"]).content)
        server.stop()
    finally:
        server.kill()

    print(f"\n{len(rounds)} kills survived:", *rounds, f"{len(accepted)} jobs accepted;"
          f" in the end {counts}", sep="\n  ")
    assert accepted, "the clients got some jobs in"
    # Jobs whose answer the kill cut off may be in the books too, paid and made.
    assert counts["completed"] + counts["failed"] >= sum(accepted.values())
