"""The suite's own PostgreSQL server (tests/postgres_server.py), which the cluster-mode
tests run the store on."""

from __future__ import annotations

from pathlib import Path

import psycopg
import pytest

from . import postgres_server
from .postgres_server import PostgresServer


def test_a_new_database_answers(postgres: PostgresServer) -> None:
    url = postgres.new_database()
    with psycopg.connect(url) as connection:
        row = connection.execute(
            "SELECT 1, current_database(), current_setting('fsync')").fetchone()
    assert row == (1, url.rsplit("/", 1)[1], "off")


def test_each_new_database_is_another_empty_one(postgres: PostgresServer) -> None:
    first, second = postgres.new_database(), postgres.new_database()
    assert first != second
    with psycopg.connect(first, autocommit=True) as connection:
        connection.execute("CREATE TABLE marker (id integer)")
    with psycopg.connect(second) as connection:
        tables = connection.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'"
        ).fetchall()
    assert tables == []


def test_the_server_goes_away_and_comes_back_on_the_same_url(postgres: PostgresServer) -> None:
    url = postgres.new_database()
    with psycopg.connect(url, autocommit=True) as connection:
        connection.execute("CREATE TABLE kept (note text)")
        connection.execute("INSERT INTO kept VALUES ('still here')")
    postgres.stop_server()
    try:
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(url, connect_timeout=2)
    finally:
        postgres.start_server()
    with psycopg.connect(url) as connection:
        assert connection.execute("SELECT note FROM kept").fetchall() == [("still here",)]


def fake_bin_dir(root: Path, version: str, tools: tuple[str, ...]) -> Path:
    bin_dir = root / version / "bin"
    bin_dir.mkdir(parents=True)
    for tool in tools:
        (bin_dir / tool).touch()
    return bin_dir


def test_the_newest_version_with_both_tools_is_used(tmp_path, monkeypatch) -> None:
    fake_bin_dir(tmp_path, "9.6", ("initdb", "pg_ctl"))
    newest_complete = fake_bin_dir(tmp_path, "15", ("initdb", "pg_ctl"))
    fake_bin_dir(tmp_path, "16", ("pg_ctl",))
    monkeypatch.setattr(postgres_server, "DEBIAN_BIN_DIRS", f"{tmp_path}/*/bin")
    assert postgres_server.postgres_bin_dir() == newest_complete


@pytest.mark.parametrize("ci, outcome", [(None, pytest.skip.Exception),
                                         ("1", pytest.fail.Exception)])
def test_missing_binaries_skip_the_test_but_fail_it_under_ci(tmp_path, monkeypatch,
                                                             ci, outcome) -> None:
    monkeypatch.setattr(postgres_server, "DEBIAN_BIN_DIRS", f"{tmp_path}/*/bin")
    monkeypatch.setenv("PATH", str(tmp_path))
    if ci is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", ci)
    with pytest.raises(outcome) as raised:
        postgres_server.require_postgres()
    assert str(raised.value) == postgres_server.MISSING
