"""What the tests share that is not a fixture: the API client helper, the test settings,
a stand-in for the model and a cheap password hasher."""

from __future__ import annotations

import threading
import time
import uuid

from argon2 import PasswordHasher
from litestar.testing import TestClient
from PIL import Image

from appliance.accounts import accounts, audit, keys
from appliance.core.database import ConnectionPool, Database
from appliance.services import Services

# Small images and few steps keep the real pipeline fast on a CPU.
TEST_GENERATION = {"width": 64, "height": 64, "steps": 2, "guidance_scale": 7.5}

# argon2id at its smallest cost. The production cost (64 MiB, three passes) takes a
# quarter of a second or more of both cores for every account the suite makes or signs
# in to, over a hundred times; only tests marked production_password_hashing are about it.
QUICK_HASHER = PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)


class Client:
    """A TestClient with the helpers the API tests share."""

    def __init__(self, client: TestClient, database: ConnectionPool, services: Services):
        self.http = client
        self.database = database
        # The running app's services, for tests that look inside (the queue, the scheduler).
        self.services = services

    def account(self, email: str = "dev@example.com", credits: int = 6) -> accounts.Account:
        return accounts.create_account(self.database.db(), email, "correct horse battery",
                                       audit.Actor.cli(), credits=credits)

    def fresh_account(self, credits: int = 6) -> accounts.Account:
        """An account no other test has: for tests that share one app."""
        return self.account(f"{uuid.uuid4().hex}@example.com", credits)

    def jobs_of(self, account: accounts.Account) -> int:
        return self.database.db().execute("SELECT COUNT(*) FROM jobs WHERE account_id = ?",
                                          [account.id]).fetchone()[0]

    def key(self, account: accounts.Account, name: str = "Production") -> str:
        return keys.create_key(self.database.db(), account.id, name, audit.Actor.cli())[1]

    def balance(self, account: accounts.Account) -> int:
        return accounts.get_account(self.database.db(), account.id).credits

    def wait_for_job(self, key: str, job_id: str, timeout: float = 60.0) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            job = self.http.get(f"/api/playground/images/{job_id}", headers=bearer(key)).json()
            if job["status"] in ("completed", "failed"):
                return job
            if time.monotonic() > deadline:
                raise AssertionError(f"job {job_id} did not finish in {timeout} s: {job}")
            time.sleep(0.05)


def count_rows(db: Database, table: str) -> int:
    """How many rows a table holds, on either database."""
    return db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]


def row_by_id(db: Database, table: str, row_id: int) -> dict:
    return next(db.query(f"SELECT * FROM {table} WHERE id = ?", [row_id]))


def database_text(db: Database) -> str:
    """Every value of every table as text: to look for what must never be stored."""
    if db.dialect == "sqlite":
        return "\n".join(db.conn.iterdump())  # type: ignore[attr-defined]
    tables = [name for (name,) in db.execute(
        "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'")]
    return "\n".join(str(row) for table in tables for row in db.execute(f"SELECT * FROM {table}"))


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


class InstantGenerator:
    """Flat images at once, in place of the model: for what surrounds the pipeline, not its images.

    Notes when each batch started and on which thread; `seconds` makes each batch take that long.
    """

    def __init__(self, seconds: float = 0.0):
        self.seconds = seconds
        self.started: list[float] = []
        self.threads: list[str] = []

    def generate(self, prompts, seeds, settings):
        self.started.append(time.monotonic())
        self.threads.append(threading.current_thread().name)
        time.sleep(self.seconds)
        return [Image.new("RGB", (settings.width, settings.height), (9, 9, 9)) for _ in prompts]
