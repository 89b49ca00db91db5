from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from litestar.testing import TestClient

from appliance.accounts import accounts, audit, keys
from appliance.core.config import Config, config_from_dict
from appliance.core.database import ConnectionPool
from appliance.engine.synth import synthesize
from appliance.services import Services
from appliance.web.app import create_app

# Every key and password the suite makes, and every log line, for test_secrets.py.
from .secret_watch import pytest_collection_modifyitems, secret_watch  # noqa: F401

# Small images and few steps keep the real pipeline fast on a CPU.
TEST_GENERATION = {"width": 64, "height": 64, "steps": 2, "guidance_scale": 7.5}


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return synthesize(tmp_path_factory.mktemp("models") / "tiny", "tiny")


@pytest.fixture
def make_config(tmp_path, tiny_model) -> Callable[..., Config]:
    def make(**sections) -> Config:
        raw = {
            "storage": {"data_dir": str(tmp_path / "data"),
                        "database": str(tmp_path / "data" / "appliance.db")},
            "model": {"path": str(tiny_model), "device": "cpu"},
            "generation": dict(TEST_GENERATION),
            # The host name Litestar's TestClient sends; any other name is refused.
            "server": {"allowed_hosts": "testserver.local"},
        }
        for name, values in sections.items():
            raw.setdefault(name, {}).update(values)
        return config_from_dict(raw, base_dir=tmp_path)

    return make


@pytest.fixture
def config(make_config) -> Config:
    return make_config()


@pytest.fixture
def database(config) -> Iterator[ConnectionPool]:
    database = ConnectionPool(config.storage.database)
    yield database
    database.close()


class Client:
    """A TestClient with the helpers the API tests share."""

    def __init__(self, client: TestClient, database: ConnectionPool, services: Services):
        self.http = client
        self.database = database
        self.services = services

    def account(self, email: str = "dev@example.com", credits: int = 6) -> accounts.Account:
        return accounts.create_account(self.database.db(), email, "correct horse battery",
                                       audit.Actor.cli(), credits=credits)

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


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
def make_client(config, database) -> Iterator[Callable[..., Client]]:
    """Starts the app (lifespan, worker, model) with an optional generator replacement."""
    clients: list[TestClient] = []

    def make(load_generator=None, app_config: Config | None = None) -> Client:
        services = Services.build(app_config or config, load_generator=load_generator)
        client = TestClient(create_app(services))
        client.__enter__()
        clients.append(client)
        deadline = time.monotonic() + 60
        while not services.engine.ready:
            if services.engine.load_error or time.monotonic() > deadline:
                raise AssertionError(f"engine not ready: {services.engine.load_error}")
            time.sleep(0.02)
        return Client(client, database, services)

    yield make
    for client in clients:
        client.__exit__(None, None, None)


@pytest.fixture
def client(make_client) -> Client:
    return make_client()
