"""Housekeeping, the scheduler, /readyz, /metrics and the structured logs."""

from __future__ import annotations

import grp
import io
import json
import logging
import os
import re
import shutil
import threading
import time
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from litestar.testing import TestClient

from appliance.accounts import accounts, audit
from appliance.accounts.signin import PAIR, SignInLimits
from appliance.core.clock import utc_iso
from appliance.core.config import LoggingConfig
from appliance.jobs.models import GenerationSettings
from appliance.jobs.store import image_relpath, mark_completed, mark_running, submit
from appliance.ops.doctor import (
    OK,
    PROBLEM,
    WARNING,
    check_database,
    check_models,
    check_models_load,
    check_permissions,
)
from appliance.ops.housekeeping import Housekeeping
from appliance.ops.initialise import make_secret_file
from appliance.runtime.logs import (
    _SECRET_PATTERNS,
    LogfmtFormatter,
    _logfmt_value,
    configure_logging,
    record_fields,
    redact,
)
from appliance.services import Services
from appliance.web.access_log import ACCESS_LOGGER, ACCESS_MESSAGE, request_target
from appliance.web.app import create_app

from .cli_helpers import invoke
from .helpers import TEST_GENERATION, bearer

NOW = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)


def fixed_clock(moment: datetime = NOW):
    return lambda: moment


def add_audit_row(db, created_at: datetime, action: str) -> None:
    db.execute("INSERT INTO audit_log (created_at, action) VALUES (?, ?)",
               [utc_iso(created_at), action])
    db.conn.commit()


def audit_actions(db) -> set[str]:
    return {row[0] for row in db.execute("SELECT action FROM audit_log")}


def test_audit_rows_are_kept_90_days_and_pruned_after(config, database):
    db = database.db()
    for days in (89, 90, 91):
        add_audit_row(db, NOW - timedelta(days=days), f"aged.{days}")
    add_audit_row(db, NOW - timedelta(days=90, seconds=1), "aged.90-and-a-second")
    housekeeping = Housekeeping(config, database, fixed_clock())

    assert housekeeping.prune_audit() == 2
    assert audit_actions(db) == {"aged.89", "aged.90"}
    # Idempotent: a second run finds nothing more.
    assert housekeeping.prune_audit() == 0
    # A day later the 90-day row is 91 days old.
    assert Housekeeping(config, database, fixed_clock(NOW + timedelta(days=1))).prune_audit() == 1
    assert audit_actions(db) == {"aged.89"}


def test_audit_retention_is_configurable(make_config, database):
    config = make_config(housekeeping={"audit_retention_days": 30})
    db = database.db()
    add_audit_row(db, NOW - timedelta(days=29), "young")
    add_audit_row(db, NOW - timedelta(days=31), "old")
    assert Housekeeping(config, database, fixed_clock()).prune_audit() == 1
    assert audit_actions(db) == {"young"}


def finished_job(db, account, images_dir, finished_at: datetime, count: int = 2) -> str:
    submitted = submit(db, account.id, None, [f"p{i}" for i in range(count)],
                            GenerationSettings(**TEST_GENERATION))
    for image in submitted.images:
        path = images_dir / image_relpath(image.job_id, image.index)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"png")
    mark_running(db, submitted.images)
    mark_completed(db, submitted.images)
    db.execute("UPDATE jobs SET finished_at = ? WHERE id = ?",
               [utc_iso(finished_at), submitted.job_id])
    db.conn.commit()
    return submitted.job_id


def test_image_retention_is_off_by_default_and_prunes_rows_and_files_when_set(make_config,
                                                                              database):
    db = database.db()
    account = accounts.create_account(db, "dev@example.com", "correct horse battery",
                                      audit.Actor.cli(), credits=10)
    default = make_config()
    images_dir = default.images_dir
    old = finished_job(db, account, images_dir, NOW - timedelta(days=31))
    recent = finished_job(db, account, images_dir, NOW - timedelta(days=29))
    unfinished = submit(db, account.id, None, ["waiting"],
                             GenerationSettings(**TEST_GENERATION)).job_id
    db.execute("UPDATE jobs SET created_at = ? WHERE id = ?",
               [utc_iso(NOW - timedelta(days=400)), unfinished])
    db.conn.commit()
    ledger_before = accounts.ledger_total(db, account.id)

    assert Housekeeping(default, database, fixed_clock()).prune_images().jobs == 0
    assert (images_dir / old).is_dir()

    pruned = Housekeeping(make_config(housekeeping={"image_retention_days": 30}), database,
                          fixed_clock()).prune_images()
    assert (pruned.jobs, pruned.images, pruned.files) == (1, 2, 2)
    remaining = {row[0] for row in db.execute("SELECT id FROM jobs")}
    assert remaining == {recent, unfinished}
    assert not (images_dir / old).exists() and (images_dir / recent / "0.png").exists()
    assert db.execute("SELECT COUNT(*) FROM job_images WHERE job_id = ?", [old]).fetchone()[0] == 0
    # The ledger keeps every credit movement; the balance is untouched.
    assert accounts.ledger_total(db, account.id) == ledger_before
    assert accounts.get_account(db, account.id).credits == ledger_before


def test_expired_console_sessions_are_deleted(config, database):
    db = database.db()
    rows = [("expired", utc_iso(NOW - timedelta(minutes=1))), ("now", utc_iso(NOW)),
            ("live", utc_iso(NOW + timedelta(minutes=1))), ("no-expiry", None)]
    for key, expires_at in rows:
        db.execute("INSERT INTO console_sessions (key_hash, value, expires_at) VALUES (?, ?, ?)",
                   [key, b"{}", expires_at])
    db.conn.commit()
    assert Housekeeping(config, database, fixed_clock()).prune_console_sessions() == 2
    assert {row[0] for row in db.execute("SELECT key_hash FROM console_sessions")} == {
        "live", "no-expiry"}


def test_failed_sign_in_counts_that_can_no_longer_matter_are_deleted(config, database):
    db = database.db()
    kept_for = SignInLimits.from_config(config.console).kept_for
    rows = [("stale", NOW - kept_for - timedelta(seconds=1)), ("recent", NOW - kept_for)]
    for email, when in rows:
        db.execute("INSERT INTO signin_failures (kind, email, ip_address, failures,"
                   " last_failed_at) VALUES (?, ?, '10.0.0.9', 6, ?)", [PAIR, email, utc_iso(when)])
    db.conn.commit()
    Housekeeping(config, database, fixed_clock()).prune_console_sessions()
    assert [row[0] for row in db.execute("SELECT email FROM signin_failures")] == ["recent"]


@pytest.mark.sqlite_only
def test_sqlite_upkeep_folds_the_wal_back(config, database):
    db = database.db()
    db.execute("CREATE TABLE filler (x)")
    db.conn.executemany("INSERT INTO filler VALUES (?)", [(b"x" * 1000,)] * 500)
    db.conn.commit()
    wal = database.path.with_name(database.path.name + "-wal")
    assert wal.stat().st_size > 0
    before, after = Housekeeping(config, database).sqlite_upkeep()
    assert before > 500_000
    assert after == 0 == wal.stat().st_size
    assert db.execute("SELECT COUNT(*) FROM filler").fetchone()[0] == 500


def test_partial_files_of_interrupted_writes_are_removed_once_an_hour_old(config, database):
    folder = config.images_dir / "job-1"
    folder.mkdir(parents=True)
    stale, fresh, png = folder / ".0.x1y2z3.tmp", folder / ".1.a1b2c3.tmp", folder / "0.png"
    for path in (stale, fresh, png):
        path.write_bytes(b"x")
    hour_ago = (NOW - timedelta(hours=1, seconds=1)).timestamp()
    os.utime(stale, (hour_ago, hour_ago))
    os.utime(png, (hour_ago, hour_ago))
    just_now = (NOW - timedelta(minutes=59)).timestamp()
    os.utime(fresh, (just_now, just_now))

    assert Housekeeping(config, database, fixed_clock()).remove_partial_files() == 1
    # A write that may still be under way, and every finished PNG, stay.
    assert not stale.exists() and fresh.exists() and png.exists()
    assert Housekeeping(config, database, fixed_clock()).remove_partial_files() == 0


@pytest.mark.sqlite_only
def test_scheduler_runs_every_job_at_startup_in_the_app_lifespan(database, make_client, caplog):
    db = database.db()
    add_audit_row(db, datetime.now(UTC) - timedelta(days=200), "ancient")
    add_audit_row(db, datetime.now(UTC), "fresh")
    db.execute("INSERT INTO console_sessions (key_hash, value, expires_at) VALUES (?, ?, ?)",
               ["stale", b"{}", utc_iso(datetime.now(UTC) - timedelta(days=1))])
    db.conn.commit()
    caplog.set_level(logging.INFO, logger="appliance.ops.housekeeping")

    client = make_client()
    scheduler = client.services.scheduler
    assert scheduler.job_ids() == ["prune-audit", "prune-console-sessions", "prune-images",
                                   "remove-partial-files", "sqlite-upkeep"]
    assert scheduler.scheduler.running
    deadline = time.monotonic() + 30
    while "ancient" in audit_actions(db) or db.execute(
            "SELECT COUNT(*) FROM console_sessions").fetchone()[0]:
        assert time.monotonic() < deadline, "the startup runs did not happen"
        time.sleep(0.05)
    assert "fresh" in audit_actions(db)
    while "database upkeep" not in caplog.text:
        assert time.monotonic() < deadline, "sqlite upkeep did not run at startup"
        time.sleep(0.05)
    assert "pruned 1 audit rows older than 90 days" in caplog.text
    assert "deleted 1 expired console sign-ins" in caplog.text
    # Every job is scheduled again: daily, or hourly for the sign-ins.
    later = {job.id: job.next_run_time for job in scheduler.scheduler.get_jobs()}
    soonest = datetime.now(UTC) + timedelta(minutes=59)
    assert all(moment > soonest for moment in later.values()), later


def metric(text: str, line_start: str) -> float:
    """The value of the one sample whose line starts with `line_start` (0 when absent)."""
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
              if line.startswith(line_start)]
    assert len(values) <= 1, values
    return values[0] if values else 0.0


NOT_FOUND_BY_TEMPLATE = ('appliance_http_requests_total{app_name="appliance",method="GET",'
                         'path="/api/playground/images/{job_id}",status_code="404"}')


def test_readyz_and_metrics_on_a_running_app(client):
    ready = client.http.get("/readyz")
    assert ready.status_code == 200
    assert ready.json() == {"status": "ready",
                            "checks": {"database": "ok", "disk": "ok", "model": "ok",
                                       "worker": "ok"},
                            "models_loaded": {"engine-worker": ["tiny"]}}
    # The counters belong to the process, which other tests share: compare before and after.
    before = client.http.get("/metrics").text

    account = client.account(credits=2)
    key = client.key(account)
    created = client.http.post("/api/playground/images", json={"prompts": ["a", "b"]},
                               headers=bearer(key))
    job_id = created.json()["jobId"]
    assert client.wait_for_job(key, job_id)["status"] == "completed"
    for unknown in ("00000000-0000-0000-0000-000000000000", "11111111-1111-1111-1111-111111111111"):
        client.http.get(f"/api/playground/images/{unknown}", headers=bearer(key))

    text = client.http.get("/metrics").text
    assert "appliance_queue_depth 0.0" in text
    assert "appliance_engine_ready 1.0" in text
    assert metric(text, "appliance_images_generated_total ") - metric(
        before, "appliance_images_generated_total ") == 2
    assert metric(text, "appliance_generation_seconds_count ") > metric(
        before, "appliance_generation_seconds_count ")
    assert 0 <= metric(text, "appliance_worker_heartbeat_age_seconds ") < 60
    assert "# TYPE appliance_gpu_memory_bytes gauge" in text
    # The tiny model's weights, held by the one worker, within its budget.
    held = metric(text, 'appliance_model_loaded_bytes{device="cpu",model="tiny",'
                        'worker="engine-worker"} ')
    assert 0 < held < metric(text, 'appliance_model_budget_bytes{device="cpu",'
                                   'worker="engine-worker"} ')
    # Requests are counted by route template: two ids, one series.
    assert metric(text, NOT_FOUND_BY_TEMPLATE) - metric(before, NOT_FOUND_BY_TEMPLATE) == 2
    assert job_id not in text and key not in text and "00000000-0000" not in text


def test_readyz_says_why_until_the_model_is_loaded(config):
    release = threading.Event()

    def slow_then_broken():
        release.wait(30)
        raise RuntimeError("no weights here")

    with TestClient(create_app(Services.build(config, load_generator=slow_then_broken))) as http:
        loading = http.get("/readyz")
        assert loading.status_code == 503 and loading.headers["retry-after"] == "5"
        assert loading.json()["error"] == ("Not ready: the model is still loading;"
                                           " the workers wait for the model")
        assert loading.json()["checks"]["database"] == "ok"
        assert http.get("/healthz").status_code == 200
        release.set()
        deadline = time.monotonic() + 30
        while "could not be loaded" not in http.get("/readyz").text:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        failed = http.get("/readyz")
        assert failed.status_code == 503
        assert "the model could not be loaded: no weights here" in failed.json()["error"]


def test_logs_are_structured_and_never_carry_secrets():
    stream = io.StringIO()
    key = "wi_live_" + "ab" * 32
    try:
        configure_logging(LoggingConfig(format="json", level="info"), stream)
        log = logging.getLogger("appliance.test")
        log.info("request with %s failed", key, extra={"event": "test", "password": "hunter2"})
        log.warning("Authorization: Bearer %s; session=0123abcd; password=hunter2", key)
        try:
            raise ValueError(f"bad key {key}")
        except ValueError:
            log.exception("boom")
        assert key[8:] not in stream.getvalue() and "hunter2" not in stream.getvalue()
        lines = [json.loads(line) for line in stream.getvalue().splitlines()]
        assert [line["level"] for line in lines] == ["info", "warning", "error"]
        assert lines[0]["event"] == "test" and lines[0]["logger"] == "appliance.test"
        assert lines[0]["password"] == "[redacted]"
        assert "ValueError" in lines[2]["exc"]

        stream.truncate(0)
        stream.seek(0)
        configure_logging(LoggingConfig(format="logfmt", level="info"), stream)
        log.info("made %d images", 3, extra={"event": "made", "count": 3})
        line = stream.getvalue().strip()
        assert re.fullmatch(r'ts=\S+Z level=info logger=appliance\.test msg="made 3 images"'
                            r' event=made count=3', line), line
    finally:
        configure_logging(LoggingConfig())
    everything = stream.getvalue()
    assert key not in everything and key[8:] not in everything
    assert "hunter2" not in everything and "0123abcd" not in everything


# Pieces of lines: the patterns' words in several cases, and letters that match ASCII
# ones only case-insensitively beyond ASCII (long s, dotted I, Kelvin sign).
LINE_PIECES = ["wi_live_", "WI_LIVE_", "Bearer ", "bearer\t", "password", "PassWd", "secret",
               "\u017fecret", "session-id", "Cookie", "authorization", "TOKEN", "=", ": ", "'",
               '"', "abc123", " ", "\u00e9", "\u0130", "\u212a", "&", ";"]


@given(st.lists(st.sampled_from(LINE_PIECES), max_size=12).map("".join))
@settings(max_examples=300, deadline=None)
def test_redaction_skips_only_lines_no_pattern_can_match(text):
    # redact() looks for each pattern's words before running it; the answer must be the
    # one every pattern run over the line gives.
    expected = text
    for pattern, replacement in _SECRET_PATTERNS:
        expected = pattern.sub(replacement, expected)
    assert redact(text) == expected


TARGET_PIECES = ["/api/playground/images/", "0f3c", "?", "a=b", "&", "%20", '"', "\\", "=",
                 "token=", "wi_live_" + "cd" * 32, "Bearer%20", "password", "\u00e9", "\u212a"]


@given(st.lists(st.sampled_from(TARGET_PIECES), min_size=1, max_size=8).map("".join))
@settings(max_examples=200, deadline=None)
def test_an_access_line_is_the_general_lines_shape_and_carries_no_key(target):
    record = logging.LogRecord(ACCESS_LOGGER, logging.INFO, "", 0, ACCESS_MESSAGE,
                               ("10.0.0.7:51234", "GET", target, 200), None)
    line = LogfmtFormatter().format(record)
    assert "cd" * 32 not in line, line
    assert line.startswith("ts=") and " level=info logger=appliance.access msg=" in line
    assert line.endswith(" status=200"), line
    # A target with none of the redaction's words is written exactly as the general
    # path (every field through one formatter) writes the line.
    if redact(target) == target and redact(line) == line:
        general = " ".join(f"{name}={_logfmt_value(value)}"
                           for name, value in record_fields(record).items())
        assert line == general


def test_the_access_target_is_what_the_client_sent():
    scope = {"path": "/a b", "raw_path": b"/a%20b", "query_string": b"x=1&y=%22"}
    assert request_target(scope) == "/a%20b?x=1&y=%22"
    assert request_target({"path": "/p", "raw_path": None, "query_string": b""}) == "/p"


@pytest.mark.parametrize("created", [
    1_764_567_890.0, 1_764_567_890.9999999, 1_764_567_891.0004, 1_764_567_891.5,
    # A minute, an hour and a day turning, read after one another: the second's text
    # is made again each time.
    1_764_575_999.999, 1_764_576_000.0, 1_764_633_600.25,
])
def test_a_lines_time_is_its_record_time_to_the_millisecond(created):
    record = logging.LogRecord("appliance", logging.INFO, "x", 1, "hello", None, None)
    record.created = created
    line = LogfmtFormatter().format(record)
    second = datetime.fromtimestamp(int(created), UTC)
    expected = utc_iso(second)[:-4] + f"{int((created - int(created)) * 1000):03d}Z"
    assert line.startswith(f"ts={expected} level=info logger=appliance msg=hello"), line


def test_doctor_names_each_account_whose_balance_differs_from_its_ledger(config, database):
    db = database.db()
    for email, credits in (("ada@example.com", 5), ("bob@example.com", 3), ("cy@example.com", 0)):
        accounts.create_account(db, email, "correct horse battery", audit.Actor.cli(),
                                credits=credits)
    accounts.grant_credits(db, "bob@example.com", 4, audit.Actor.cli())

    def ledger_findings():
        return [(f.level, f.text) for f in check_database(config) if f.area == "ledger"]

    assert ledger_findings() == [(OK, "every account's balance equals the sum of its ledger")]
    # Changed behind the ledger's back, as a hand-made SQL fix would.
    db.execute("UPDATE accounts SET credits = 99 WHERE email = 'bob@example.com'")
    db.execute("UPDATE accounts SET credits = 1 WHERE email = 'cy@example.com'")
    db.conn.commit()

    [(level, text)] = ledger_findings()
    assert level == PROBLEM
    assert text.startswith("2 account(s) differ from their ledger: bob@example.com has 99"
                           " credits but its ledger adds up to 7; cy@example.com has 1 credits"
                           " but its ledger adds up to 0.")
    assert "ada@example.com" not in text


@pytest.mark.sqlite_only
def test_doctor_warns_when_other_users_can_read_the_data(config, database):
    make_secret_file(config.secret_file)
    data, db_file, secret = config.storage.data_dir, config.storage.database, config.secret_file

    def permission_findings():
        return [(f.level, f.text) for f in check_permissions(config)]

    assert permission_findings() == [
        (OK, "no other user can read the data folder, the database or the secret")]
    os.chmod(data, 0o755)
    os.chmod(db_file, 0o644)
    assert permission_findings() == [
        (WARNING, f"{data} is open to every user of this machine (mode 0755); it holds"
                  f" accounts' data: chmod 700 {data}"),
        (WARNING, f"{db_file} is open to every user of this machine (mode 0644); it holds"
                  f" accounts' data: chmod 600 {db_file}")]

    # A group other than the owner's own one shares the file with its members.
    os.chmod(data, 0o700)
    os.chmod(db_file, 0o600)
    others = ([group.gr_gid for group in grp.getgrall() if group.gr_gid != os.getgid()]
              if os.geteuid() == 0 else [gid for gid in os.getgroups() if gid != os.getgid()])
    if not others:
        pytest.skip("this user can give its files to no other group")
    os.chown(secret, -1, others[0])
    os.chmod(secret, 0o640)
    [(level, text)] = permission_findings()
    assert level == WARNING
    assert text.startswith(f"{secret} is open to the group {grp.getgrgid(others[0]).gr_name}"
                           " (mode 0640)")


@pytest.fixture
def installed_models(tmp_path, tiny_model, make_config):
    """model.dir with two copies of the tiny model and one whose unet folder is missing."""
    model_dir = tmp_path / "installed"
    for name in ("alpha", "beta", "broken"):
        shutil.copytree(tiny_model, model_dir / name)
    shutil.rmtree(model_dir / "broken" / "unet")
    return make_config(model={"dir": str(model_dir), "path": str(model_dir / "alpha"),
                              "lora_dir": str(tmp_path / "loras")})


def test_doctor_checks_every_installed_model_by_name(installed_models):
    model_dir = installed_models.models_dir
    findings = [(f.level, f.text) for f in check_models(installed_models)]

    tiny = "holds a StableDiffusionPipeline of only"
    assert [level for level, _ in findings] == [WARNING, WARNING, PROBLEM]
    assert findings[0][1].startswith(f"model 'alpha': {model_dir / 'alpha'} {tiny}")
    assert findings[1][1].startswith(f"model 'beta': {model_dir / 'beta'} {tiny}")
    assert findings[2][1] == (f"model 'broken': {model_dir / 'broken'} lacks the folders unet"
                              " that its model_index.json lists: the download is incomplete;"
                              " pull it again")


def test_doctor_finds_weights_that_will_not_load_without_loading_them(installed_models):
    weights = next((installed_models.models_dir / "beta" / "vae").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:100])  # cut short, as by a full disk
    findings = [(f.level, f.text) for f in check_models(installed_models)]
    assert findings[1][0] == PROBLEM
    assert findings[1][1].startswith(f"model 'beta': {weights} is not a readable safetensors"
                                     " file (")
    assert findings[1][1].endswith("): the model will not load; pull it again")


def test_doctor_names_a_missing_default_model_and_adapters_for_missing_models(
        tmp_path, installed_models, make_config):
    lora = tmp_path / "loras" / "ink"
    lora.mkdir(parents=True)
    (lora / "ink.safetensors").write_bytes(b"weights")
    (lora / "lora.json").write_text(json.dumps({"base_models": ["beta", "gamma", "delta"]}))
    config = make_config(model={"dir": str(installed_models.models_dir),
                                "path": str(installed_models.model.path),
                                "lora_dir": str(tmp_path / "loras"), "default": "omega"})

    findings = [(f.level, f.area, f.text) for f in check_models(config)]

    assert findings[0] == (PROBLEM, "model", "model.default is 'omega', which is not installed"
                           " (installed: alpha, beta, broken): requests that name no model are"
                           " refused")
    assert findings[-1] == (WARNING, "lora", f"the LoRA adapter 'ink' ({lora}) fits gamma, delta,"
                            " which are not installed")


def test_doctor_loads_each_model_when_asked(installed_models):
    shutil.rmtree(installed_models.models_dir / "beta")  # one good model is enough, and faster
    findings = [(f.level, f.text) for f in check_models_load(installed_models)]

    assert [level for level, _ in findings] == [OK, PROBLEM]
    assert re.fullmatch(r"model 'alpha' loads: a StableDiffusionPipeline, on the CPU in"
                        r" \d+\.\d s", findings[0][1])
    assert findings[1][1].startswith("model 'broken' does not load: Could not load the model in"
                                     f" {installed_models.models_dir / 'broken'}")


def test_doctor_runs_the_load_check_only_with_its_option(tmp_path, installed_models):
    shutil.rmtree(installed_models.models_dir / "beta")
    config_path = tmp_path / "doctor.toml"
    config_path.write_text(f'[model]\ndir = "{installed_models.models_dir}"\n'
                           f'path = "{installed_models.model.path}"\ndevice = "cpu"\n'
                           f'[storage]\ndata_dir = "{tmp_path / "state"}"\n')

    quick = invoke(config_path, "doctor")
    deep = invoke(config_path, "doctor", "--load-models")

    assert "model 'broken':" in quick.output and "loads" not in quick.output
    loads = [line for line in deep.output.splitlines() if line.split()[1:2] == ["load"]]
    assert [line.split()[0] for line in loads] == [OK, PROBLEM]
    assert quick.exit_code == deep.exit_code == 1
