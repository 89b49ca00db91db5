"""What the appliance writes is its owner's alone: folders 0700, files 0600, whatever the umask.

Each test runs under umask 022, the usual one outside systemd, which on its own
would leave everything readable by every user of the machine.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from appliance.cli.main import cli
from appliance.core.database import ConnectionPool
from appliance.ops.backup import create_backup, restore_backup

from .helpers import InstantGenerator, bearer


@pytest.fixture(autouse=True)
def open_umask() -> Iterator[None]:
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def shared(root: Path) -> dict[str, str]:
    """Everything under root (root included) whose mode is not owner-only, with its mode."""
    found = {}
    for path in [root, *root.rglob("*")]:
        mode = path.stat().st_mode & 0o777
        if mode != (0o700 if path.is_dir() else 0o600):
            found[str(path.relative_to(root.parent))] = f"{mode:04o}"
    return found


def test_init_makes_the_data_owner_only(tmp_path, root_handlers_restored):
    config = tmp_path / "config.toml"
    config.write_text('[storage]\ndata_dir = "state/data"\ndatabase = "state/data/app.db"\n')

    result = CliRunner().invoke(cli, ["init", "--config", str(config)])

    assert result.exit_code == 0, result.output
    state = tmp_path / "state"
    assert {path.name for path in (state / "data").iterdir()} == {"app.db", "images",
                                                                 "secret_key"}
    assert shared(state) == {}
    # The -wal and -shm files exist while a connection is open.
    database = ConnectionPool(state / "data" / "app.db")
    try:
        assert {"app.db-wal", "app.db-shm"} <= {path.name for path in (state / "data").iterdir()}
        assert shared(state) == {}
    finally:
        database.close()


@pytest.mark.sqlite_only
def test_images_backups_and_restores_are_owner_only(make_client, config, tmp_path):
    client = make_client(load_generator=InstantGenerator)
    account = client.account(credits=2)
    key = client.key(account)
    job_id = client.http.post("/api/playground/images", json={"prompts": ["a", "b"]},
                              headers=bearer(key)).json()["jobId"]
    assert client.wait_for_job(key, job_id)["completedImages"] == 2

    data = config.storage.data_dir
    images = [path for path in config.images_dir.rglob("*.png")]
    assert len(images) == 2
    assert shared(data) == {}

    backup = tmp_path / "backups" / "monday"
    create_backup(config, backup)
    assert {path.name for path in backup.iterdir()} >= {"appliance.db", "images", "manifest.json"}
    assert shared(backup) == {}

    summary = restore_backup(config, backup)
    assert summary.images == 2 and summary.previous is not None
    assert (data / "serve.lock").exists()
    assert shared(data) == {}
