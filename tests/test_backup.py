"""`appliance backup` while jobs are written, and `appliance restore` of it."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

from appliance.accounts import accounts, audit
from appliance.cli.main import main
from appliance.core.database import ConnectionPool
from appliance.core.errors import ApplianceError, Conflict
from appliance.engine.storage import write_png_atomic
from appliance.jobs.models import GenerationSettings
from appliance.jobs.store import image_relpath, mark_completed, mark_running, submit
from appliance.ops.backup import create_backup, integrity_problem, restore_backup
from appliance.ops.lock import service_lock

from .helpers import TEST_GENERATION

# appliance backup and restore copy SQLite's file (cluster mode refuses them: test_cluster).
pytestmark = pytest.mark.sqlite_only

SETTINGS = GenerationSettings(**TEST_GENERATION)


class JobWriter(threading.Thread):
    """Submits jobs as fast as it can, each in its own transaction, like the API does."""

    def __init__(self, database: ConnectionPool, account_id: int):
        super().__init__(daemon=True)
        self.database = database
        self.account_id = account_id
        self.committed: list[str] = []
        self.stop = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            db = self.database.db()
            while not self.stop.is_set():
                submitted = submit(db, self.account_id, None, ["a", "b", "c"], SETTINGS)
                self.committed.append(submitted.job_id)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc


def restored_rows(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{path}?mode=ro", uri=True)


def test_backup_while_jobs_are_written_restores_every_committed_row(make_config, database,
                                                                    tmp_path):
    config = make_config()
    db = database.db()
    account = accounts.create_account(db, "dev@example.com", "correct horse battery",
                                      audit.Actor.cli(), credits=1_000_000)
    finished = submit(db, account.id, None, ["kept"], SETTINGS)
    mark_running(db, finished.images)
    png = config.images_dir / image_relpath(finished.job_id, 0)
    write_png_atomic(Image.new("RGB", (8, 8), "red"), png)
    mark_completed(db, finished.images)
    config.secret_file.write_text("s" * 64)

    writer = JobWriter(database, account.id)
    writer.start()
    while len(writer.committed) < 50:
        assert writer.error is None, writer.error
        time.sleep(0.01)
    committed_before = list(writer.committed)
    summary = create_backup(config, tmp_path / "backup")
    written_during = len(writer.committed) - len(committed_before)
    writer.stop.set()
    writer.join(30)
    assert writer.error is None, writer.error
    assert len(writer.committed) > len(committed_before), "the writer stalled during the backup"

    backup = tmp_path / "backup"
    manifest = json.loads((backup / "manifest.json").read_text())
    assert manifest["integrity_check"] == "ok" and manifest["images"] == summary.images == 1
    assert integrity_problem(backup / "appliance.db") is None
    assert (backup / "secret_key").stat().st_mode & 0o777 == 0o600
    assert backup.stat().st_mode & 0o777 == 0o700

    # Restore into a fresh installation.
    other = make_config(storage={"data_dir": str(tmp_path / "other"),
                                 "database": str(tmp_path / "other" / "appliance.db")})
    restored = restore_backup(other, backup)
    assert restored.previous is None and restored.images == 1
    assert integrity_problem(other.storage.database) is None
    conn = restored_rows(other.storage.database)
    job_ids = {row[0] for row in conn.execute("SELECT id FROM jobs")}
    assert set(committed_before) | {finished.job_id} <= job_ids
    # A snapshot, never half a transaction: every job has its three images and
    # its charge, and the balance matches the ledger.
    assert conn.execute("SELECT COUNT(*) FROM jobs j WHERE (SELECT COUNT(*) FROM job_images i"
                        " WHERE i.job_id = j.id) != j.total_images").fetchone()[0] == 0
    charged = conn.execute("SELECT -SUM(delta) FROM credit_ledger WHERE reason = 'image job'"
                           ).fetchone()[0]
    assert charged == conn.execute("SELECT SUM(credits_used) FROM jobs").fetchone()[0]
    balance = conn.execute("SELECT credits FROM accounts").fetchone()[0]
    assert balance == conn.execute("SELECT SUM(delta) FROM credit_ledger").fetchone()[0]
    conn.close()
    assert (other.images_dir / image_relpath(finished.job_id, 0)).read_bytes() == png.read_bytes()
    assert other.secret_file.read_text() == "s" * 64
    print(f"jobs committed while the backup ran: {written_during}")


def test_restore_refuses_while_the_service_runs_and_keeps_what_it_replaces(make_config, database,
                                                                           tmp_path):
    config = make_config()
    db = database.db()
    accounts.create_account(db, "before@example.com", "correct horse battery", audit.Actor.cli())
    create_backup(config, tmp_path / "backup")
    accounts.create_account(db, "after@example.com", "correct horse battery", audit.Actor.cli())
    database.close()

    with service_lock(config.storage.data_dir, "start the service"), \
            pytest.raises(Conflict, match="cannot restore: the service is running"):
            restore_backup(config, tmp_path / "backup")
    assert (config.storage.database).exists()

    summary = restore_backup(config, tmp_path / "backup")
    conn = restored_rows(config.storage.database)
    assert [row[0] for row in conn.execute("SELECT email FROM accounts")] == ["before@example.com"]
    conn.close()
    # The replaced database was moved aside, not deleted.
    assert summary.previous is not None
    kept = restored_rows(summary.previous / "appliance.db")
    assert {row[0] for row in kept.execute("SELECT email FROM accounts")} == {
        "before@example.com", "after@example.com"}
    kept.close()


def test_backup_and_restore_refuse_what_they_cannot_do(make_config, database, tmp_path):
    config = make_config()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(ApplianceError, match="already exists and is not an empty folder"):
        create_backup(config, tmp_path / "full")
    with pytest.raises(ApplianceError, match="is not a backup made by `appliance backup`"):
        restore_backup(config, tmp_path / "full")

    create_backup(config, tmp_path / "backup")
    with (tmp_path / "backup" / "appliance.db").open("r+b") as fh:
        fh.seek(4096)
        fh.write(b"\xff" * 4096)
    with pytest.raises(ApplianceError, match="the backup's database is damaged"):
        restore_backup(config, tmp_path / "backup")
    assert integrity_problem(config.storage.database) is None


@pytest.mark.usefixtures("root_handlers_restored")
def test_backup_and_restore_commands(tmp_path, capsys):
    config = tmp_path / "config.toml"
    config.write_text('[storage]\ndata_dir = "state"\ndatabase = "state/app.db"\n')
    ConnectionPool(tmp_path / "state" / "app.db").close()

    assert main(["backup", str(tmp_path / "b1"), "--config", str(config)]) == 0
    assert "(integrity check: ok)" in capsys.readouterr().out
    assert (tmp_path / "b1" / "config.toml").read_text() == config.read_text()
    assert main(["backup", str(tmp_path / "b1"), "--config", str(config)]) == 1
    assert "already exists" in capsys.readouterr().err
    assert main(["restore", str(tmp_path / "b1"), "--config", str(config)]) == 0
    assert "the data it replaced is kept in" in capsys.readouterr().out
