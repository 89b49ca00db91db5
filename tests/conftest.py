from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from litestar.testing import TestClient

from appliance.accounts import accounts
from appliance.bench.serving import answers_ok
from appliance.core.config import Config, config_from_dict
from appliance.core.database import ConnectionPool
from appliance.engine.synth import synthesize
from appliance.services import Services
from appliance.web.app import create_app

from .cli_helpers import write_cli_config
from .helpers import QUICK_HASHER, TEST_GENERATION, Client, InstantGenerator
from .postgres_server import PostgresServer, require_postgres
from .serve_process import Launcher, ServeProcess, free_port


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--boot", action="store_true",
                     help="run the boot test (tests/test_boot.py): the system install on a"
                          " Debian booted in a container; .ci/run's last step")
    parser.addoption("--database", choices=DATABASE_KINDS, default="sqlite",
                     help="the database the app fixtures use (make_config, client, ...):"
                          " postgresql runs them on a PostgreSQL server the tests start;"
                          " modules marked both_databases run on both whatever this says")


DATABASE_KINDS = ("sqlite", "postgresql")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if (metafunc.definition.get_closest_marker("both_databases")
            and "database_kind" in metafunc.fixturenames):
        metafunc.parametrize("database_kind", DATABASE_KINDS, indirect=True)


@pytest.fixture
def database_kind(request) -> str:
    """sqlite or postgresql: both, for a test marked both_databases; sqlite for one marked
    sqlite_only (it is about SQLite's file or locks); else --database."""
    if request.node.get_closest_marker("sqlite_only"):
        return "sqlite"
    return getattr(request, "param", None) or request.config.getoption("--database")


@pytest.fixture(autouse=True)
def quick_password_hashing(request, monkeypatch) -> None:
    # Hashes carry their parameters, so verify_password checks these as it
    # checks production ones; a server process the test starts hashes at full cost.
    if request.node.get_closest_marker("production_password_hashing") is None:
        monkeypatch.setattr(accounts, "_hasher", QUICK_HASHER)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return synthesize(tmp_path_factory.mktemp("models") / "tiny", "tiny")


def config_for_tests(folder: Path, tiny_model: Path, database_url: str | None = None,
                     **sections) -> Config:
    """The tests' config: its data in `folder`, the tiny model on the CPU; `sections` add to it.
    The database is a SQLite file in `folder`, or the PostgreSQL database at `database_url`."""
    raw = {
        "storage": {"data_dir": str(folder / "data"),
                    "database": database_url or str(folder / "data" / "appliance.db")},
        "model": {"path": str(tiny_model), "device": "cpu"},
        "generation": dict(TEST_GENERATION),
        # The host name Litestar's TestClient sends; any other name is refused.
        "server": {"allowed_hosts": "testserver.local"},
    }
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return config_from_dict(raw, base_dir=folder)


@pytest.fixture
def make_config(request, tmp_path, tiny_model, database_kind) -> Callable[..., Config]:
    # One database per test, made on first use (several configs of one test share it).
    url = (request.getfixturevalue("postgres").new_database()
           if database_kind == "postgresql" else None)

    def make(**sections) -> Config:
        return config_for_tests(tmp_path, tiny_model, url, **sections)

    return make


@pytest.fixture
def config(make_config) -> Config:
    return make_config()


@pytest.fixture
def database(config) -> Iterator[ConnectionPool]:
    database = ConnectionPool(config.storage.database)
    yield database
    database.close()


def wait_until_ready(services: Services) -> None:
    """Until the engine has loaded its model (an app's lifespan starts it)."""
    deadline = time.monotonic() + 60
    while not services.engine.ready:
        if services.engine.load_error or time.monotonic() > deadline:
            raise AssertionError(f"engine not ready: {services.engine.load_error}")
        time.sleep(0.02)


@pytest.fixture
def make_client(config, database) -> Iterator[Callable[..., Client]]:
    """Starts the app (lifespan, worker, model) with an optional generator replacement."""
    clients: list[TestClient] = []

    def make(load_generator=None, app_config: Config | None = None) -> Client:
        services = Services.build(app_config or config, load_generator=load_generator)
        client = TestClient(create_app(services))
        client.__enter__()
        clients.append(client)
        wait_until_ready(services)
        return Client(client, database, services)

    yield make
    for client in clients:
        client.__exit__(None, None, None)


@pytest.fixture
def client(make_client) -> Client:
    return make_client()


@pytest.fixture(scope="module")
def shared_instant_client(tmp_path_factory, tiny_model) -> Iterator[Client]:
    """One app (InstantGenerator in place of the model) for all of a module's tests that
    use it. For tests run over many inputs that each make their own account
    (Client.fresh_account) and look at nothing beyond it: starting an app for every input
    was a good part of the quick tests' time."""
    config = config_for_tests(tmp_path_factory.mktemp("shared"), tiny_model)
    database = ConnectionPool(config.storage.database)
    services = Services.build(config, load_generator=InstantGenerator)
    with TestClient(create_app(services)) as client:
        wait_until_ready(services)
        yield Client(client, database, services)
    database.close()


@pytest.fixture
def instant_client(make_client) -> Client:
    """The app with InstantGenerator in place of the model, for tests of what surrounds the
    pipeline: loading the model, and running it for every job, would be most of their time."""
    return make_client(load_generator=InstantGenerator)


@pytest.fixture
def config_file(tmp_path) -> Path:
    """A config file for in-process commands (cli_helpers.invoke)."""
    return write_cli_config(tmp_path)


@pytest.fixture
def root_handlers_restored() -> Iterator[None]:
    """For tests that run main(): it points the root logger at the test's captured stderr,
    which closes after the test, and every later log line would fail to be written there."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture(scope="session")
def launcher() -> Iterator[Launcher]:
    """Forks real `appliance serve` processes from one interpreter that has imported torch."""
    launcher = Launcher()
    yield launcher
    launcher.close()


def newcomer_config(folder: Path) -> tuple[Path, str]:
    """A config of its own and no model folder, so that serve makes the demo model itself;
    and the base URL it serves."""
    port = free_port()
    config = folder / "config.toml"
    config.write_text(
        f'[server]\nport = {port}\n'
        '[model]\npath = "models/demo"\ndevice = "cpu"\n'
        '[generation]\nwidth = 64\nheight = 64\nsteps = 2\n'
    )
    return config, f"http://127.0.0.1:{port}"


@pytest.fixture
def fresh_server(tmp_path):
    """`python -m appliance serve` as a newcomer starts it: a config of its own and no model
    folder, so that it makes the demo model itself. (base URL, config, process, log)"""
    config, base = newcomer_config(tmp_path)
    log_path = tmp_path / "serve.log"
    with log_path.open("wb") as log:
        command = [sys.executable, "-m", "appliance", "serve", "--config", str(config)]
        process = subprocess.Popen(command,
                                   stdout=log, stderr=subprocess.STDOUT,
                                   env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if not answers_ok(f"{base}/healthz", lambda: process.poll() is None, 120):
        process.kill()
        raise AssertionError(f"server did not start:\n{log_path.read_text()}")
    yield base, config, process, log_path
    if process.poll() is None:
        process.kill()
        process.wait()


@pytest.fixture
def forked_server(tmp_path, launcher):
    """The newcomer's server of fresh_server, forked by the launcher from an interpreter that
    has imported torch: for tests of what the server shows (the browser tests), not of how
    an interpreter starts it. (base URL, config, ServeProcess, log)"""
    config, _ = newcomer_config(tmp_path)
    log_path = tmp_path / "serve.log"
    server = ServeProcess(config, log_path, launcher).start()
    yield server.url, config, server, log_path
    server.kill()


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """One PostgreSQL server of the suite's own for the whole run; a test takes a database
    of its own from it with postgres.new_database()."""
    bin_dir = require_postgres()
    server = PostgresServer.start(bin_dir=bin_dir)
    yield server
    server.stop()
