"""`appliance doctor`: checks the GPU, driver, models, database, files and config, in plain words.

Each finding is ok, note, warning or problem; only a problem makes the command
exit non-zero, since only a problem stops the service from doing its work.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import shutil
import sqlite3
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from sqlite_utils import Database

from appliance.core.config import Config
from appliance.core.database import (
    FIRST_MIGRATION,
    DatabaseError,
    connect,
    pending_migrations,
    problem_sentence,
)
from appliance.core.database_url import DatabaseUrl
from appliance.core.devices import cuda_index
from appliance.jobs.catalog import Catalog
from appliance.ops.lock import holder

OK, NOTE, WARNING, PROBLEM = "ok", "note", "warning", "problem"
WEIGHT_SUFFIXES = (".safetensors", ".bin")
# The tiny demo model weighs well under a megabyte; real ones weigh gigabytes.
DEMO_MODEL_BYTES = 50 * 1024 * 1024
LOW_DISK_BYTES = 2 * 1024**3
MIB = 1024**2
# Accounts whose balance differs from their ledger named in full; past this many, counted.
LEDGER_NAMED = 10


@dataclass(frozen=True)
class Finding:
    level: str
    area: str
    text: str


def check_config(config: Config) -> Iterator[Finding]:
    if config.source is None:
        yield Finding(NOTE, "config", "no config file found: running on the built-in defaults")
    else:
        yield Finding(OK, "config", f"{config.source} is valid")


def _nvidia_smi() -> tuple[str | None, str | None]:
    """(GPU lines, None) when nvidia-smi works, (None, why) when it is missing or fails."""
    if shutil.which("nvidia-smi") is None:
        return None, "nvidia-smi is not installed"
    try:
        result = subprocess.run(
            ["nvidia-smi", "--query-gpu=index,name,driver_version,memory.total",
             "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return None, "nvidia-smi did not answer within 30 s"
    if result.returncode != 0:
        why = (result.stdout + result.stderr).strip().splitlines()
        return None, f"nvidia-smi fails: {why[0] if why else f'exit code {result.returncode}'}"
    return result.stdout.strip(), None


def check_gpu(config: Config) -> Iterator[Finding]:
    import torch

    wanted_gpu = cuda_index(config.model.device)
    wants_cuda = wanted_gpu is not None
    gpus, smi_problem = _nvidia_smi()
    if gpus is None and smi_problem == "nvidia-smi is not installed":
        level = PROBLEM if wants_cuda else WARNING
        yield Finding(level, "gpu", "no NVIDIA driver found (nvidia-smi is not installed):"
                      + (f" model.device is {config.model.device}, which needs one" if wants_cuda
                         else " images will be generated on the CPU, which is very slow"))
    elif gpus is None:
        yield Finding(PROBLEM, "driver", f"{smi_problem}; the NVIDIA driver is not loaded or does"
                      " not match its tools (a reboot after a driver update often fixes this)")
    else:
        for line in gpus.splitlines():
            yield Finding(OK, "driver", f"GPU {line.strip()}")
        for node in ("/dev/nvidiactl", "/dev/nvidia-uvm"):
            if os.path.exists(node) and not os.access(node, os.R_OK | os.W_OK):
                yield Finding(PROBLEM, "gpu", f"this user cannot open {node}: add it to the group"
                              " that owns the device (usually video)")
    if torch.version.cuda is None:
        if gpus is not None:
            yield Finding(PROBLEM, "gpu", f"torch {torch.__version__} is a CPU-only build although"
                          " an NVIDIA GPU is present: re-run install.sh to get the CUDA build")
        return
    if not torch.cuda.is_available():
        if gpus is not None or wants_cuda:
            yield Finding(PROBLEM, "gpu", f"torch {torch.__version__} (CUDA {torch.version.cuda})"
                          " cannot use the GPU: the driver may be older than this CUDA needs")
        return
    count = torch.cuda.device_count()
    names = ", ".join(torch.cuda.get_device_name(i) for i in range(count))
    yield Finding(OK, "gpu", f"torch {torch.__version__} uses CUDA {torch.version.cuda} on"
                  f" {count} GPU(s): {names}")
    if wanted_gpu is not None and wanted_gpu >= count:
        yield Finding(PROBLEM, "gpu", f"model.device is {config.model.device} but there are only"
                      f" {count} GPU(s)")


def _weight_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*")
               if path.is_file() and path.name.endswith(WEIGHT_SUFFIXES))


def check_models(config: Config) -> Iterator[Finding]:
    """Every installed model's folder, the default model, and the adapters' base models."""
    catalog = Catalog(config)
    models = catalog.models()
    names = {model.name for model in models}
    if catalog.default_name not in names:
        yield Finding(PROBLEM, "model", f"model.default is {catalog.default_name!r}, which is not"
                      f" installed (installed: {', '.join(sorted(names))}): requests that name no"
                      " model are refused")
    for model in models:
        yield from _check_model_folder(model.name, model.path, model.path == config.model.path)
    for lora in catalog.loras():
        missing = [base for base in lora.base_models if base not in names]
        if missing:
            verb = "is" if len(missing) == 1 else "are"
            yield Finding(WARNING, "lora", f"the LoRA adapter {lora.name!r} ({lora.path.parent})"
                          f" fits {', '.join(missing)}, which {verb} not installed")


def _check_model_folder(name: str, folder: Path, is_demo_place: bool) -> Iterator[Finding]:
    model = f"model {name!r}"
    if not folder.exists() and is_demo_place:
        yield Finding(WARNING, "model", f"there is no {model} at {folder} yet: the service will"
                      " create the tiny demo model there, whose images are noise. Install a real"
                      " one with `appliance models pull REPO_ID NAME`")
        return
    index_file = folder / "model_index.json"
    if not index_file.is_file():
        yield Finding(PROBLEM, "model", f"{model}: {folder} has no model_index.json: it is not a"
                      " diffusers pipeline (a download may have been interrupted; pull it again)")
        return
    try:
        index = json.loads(index_file.read_text())
    except (OSError, ValueError) as exc:
        yield Finding(PROBLEM, "model", f"{model}: {index_file} cannot be read: {exc}")
        return
    components = sorted(part for part, value in index.items() if not part.startswith("_")
                        and isinstance(value, list) and value and value[0] is not None
                        and part not in ("safety_checker", "feature_extractor"))
    missing = [part for part in components if not (folder / part).is_dir()]
    if missing:
        yield Finding(PROBLEM, "model", f"{model}: {folder} lacks the folders {', '.join(missing)}"
                      " that its model_index.json lists: the download is incomplete; pull it"
                      " again")
        return
    unweighted = [part for part in components if (folder / part / "config.json").exists()
                  and _weight_bytes(folder / part) == 0]
    if unweighted:
        yield Finding(PROBLEM, "model", f"{model}: {folder}: {', '.join(unweighted)} has no"
                      " weights file (.safetensors or .bin): the download is incomplete; pull it"
                      " again")
        return
    unreadable = [str(path) for path in folder.rglob("*") if not os.access(path, os.R_OK)]
    if unreadable:
        yield Finding(PROBLEM, "model", f"{model}: this user cannot read {unreadable[0]}"
                      + (f" and {len(unreadable) - 1} more files" if len(unreadable) > 1 else ""))
        return
    broken = _unreadable_safetensors(folder)
    if broken:
        path, reason = broken
        yield Finding(PROBLEM, "model", f"{model}: {path} is not a readable safetensors file"
                      f" ({reason}): the model will not load; pull it again")
        return
    size = _weight_bytes(folder)
    kind = index.get("_class_name", "a pipeline")
    if size < DEMO_MODEL_BYTES:
        yield Finding(WARNING, "model", f"{model}: {folder} holds a {kind} of only"
                      f" {size // 1024} KiB: the tiny demo model, whose images are noise")
    else:
        yield Finding(OK, "model", f"{model}: {folder} holds a {kind}"
                      f" ({size / 1024**3:.1f} GiB of weights)")


def _unreadable_safetensors(folder: Path) -> tuple[Path, str] | None:
    """The first weights file whose header does not read, and why: it lists every tensor,
    so a truncated or overwritten file shows here without loading a weight."""
    from safetensors import safe_open

    for path in sorted(folder.glob("*/*.safetensors")):
        try:
            with safe_open(str(path), framework="numpy") as weights:
                weights.keys()
        except Exception as exc:  # noqa: BLE001 - each kind of damage raises its own type
            return path, str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return None


def check_models_load(config: Config) -> Iterator[Finding]:
    """Loads each installed model's pipeline on the CPU, one at a time: what the engine does
    at its first request for it, minus the GPU. Slow, and it needs each model's size in RAM."""
    import gc

    import diffusers
    import torch
    import transformers

    from appliance.engine.pipeline import load_pipeline

    # Their progress bars would come between doctor's lines.
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    for model in Catalog(config).models():
        if not (model.path / "model_index.json").is_file():
            continue  # check_models has said why
        started = time.monotonic()
        try:
            pipeline = load_pipeline(model.path, "cpu", torch.float32)
        except Exception as exc:  # noqa: BLE001 - any failure to load is the finding
            yield Finding(PROBLEM, "load", f"model {model.name!r} does not load: {exc}")
            continue
        seconds = time.monotonic() - started
        kind = type(pipeline).__name__
        del pipeline  # before the next one: two large models at once may not fit in RAM
        gc.collect()
        yield Finding(OK, "load", f"model {model.name!r} loads: a {kind}, on the CPU in"
                      f" {seconds:.1f} s")


def check_database(config: Config) -> Iterator[Finding]:
    from appliance.core.schema import migrations

    data_dir = config.storage.data_dir
    if data_dir.exists():
        if not os.access(data_dir, os.W_OK):
            yield Finding(PROBLEM, "storage", f"this user cannot write to {data_dir}")
        free = shutil.disk_usage(data_dir).free
        if free < config.health.min_free_disk_mb * MIB:
            yield Finding(PROBLEM, "storage", f"only {free // MIB} MiB free on the disk of"
                          f" {data_dir}, below health.min_free_disk_mb"
                          f" ({config.health.min_free_disk_mb}): /readyz fails and new images"
                          " cannot be saved")
        elif free < LOW_DISK_BYTES:
            yield Finding(WARNING, "storage", f"only {free / 1024**3:.1f} GiB free on the disk of"
                          f" {data_dir}")
    if isinstance(config.storage.database, DatabaseUrl):
        yield from _check_postgres(config.storage.database)
        return
    path = config.storage.database
    if not path.exists():
        yield Finding(NOTE, "database", f"there is no database at {path} yet: `appliance init`"
                      " or the first start creates it")
        return
    try:
        conn = sqlite3.connect(f"{path.absolute().as_uri()}?mode=ro", uri=True, timeout=10)
        try:
            result = [row[0] for row in conn.execute("PRAGMA quick_check")]
            pending = [m.name for m in migrations.pending(Database(conn))]
            unbalanced = [] if result != ["ok"] else conn.execute(LEDGER_MISMATCHES).fetchall()
        finally:
            conn.close()
    except sqlite3.Error as exc:
        yield Finding(PROBLEM, "database", problem_sentence(path, exc))
        return
    if result != ["ok"]:
        yield Finding(PROBLEM, "database", f"{path} is damaged ({'; '.join(result[:3])}): restore"
                      " the last backup with `appliance restore`")
        return
    yield from _ledger_findings(unbalanced)
    yield _schema_finding(pending, f"{path} is fine",
                          f"{path} passes its integrity check and is up to date")


def _check_postgres(url: DatabaseUrl) -> Iterator[Finding]:
    try:
        db = connect(url)
        try:
            pending = pending_migrations(db)
            unbalanced = ([] if FIRST_MIGRATION in pending
                          else db.execute(LEDGER_MISMATCHES).fetchall())
        finally:
            db.close()
    except DatabaseError as exc:
        yield Finding(PROBLEM, "database", problem_sentence(url, exc))
        return
    yield from _ledger_findings(unbalanced)
    yield _schema_finding(pending, f"{url} answers", f"{url} answers and its schema is up to date")


def _schema_finding(pending: list[str], fine: str, up_to_date: str) -> Finding:
    if pending:
        return Finding(NOTE, "database", f"{fine}; the next start upgrades its schema"
                       f" ({', '.join(pending)})")
    return Finding(OK, "database", up_to_date)


# Every balance change writes its ledger row in the same transaction, so a balance
# that differs from the sum of its ledger was changed some other way (raw SQL, a bug).
LEDGER_MISMATCHES = """
    SELECT a.email, a.credits, COALESCE(SUM(l.delta), 0) AS ledger
    FROM accounts a LEFT JOIN credit_ledger l ON l.account_id = a.id
    GROUP BY a.id HAVING a.credits != COALESCE(SUM(l.delta), 0) ORDER BY a.id
"""


def _ledger_findings(unbalanced: list[tuple[str, int, int]]) -> Iterator[Finding]:
    if not unbalanced:
        yield Finding(OK, "ledger", "every account's balance equals the sum of its ledger")
        return
    named = "; ".join(f"{email} has {balance} credits but its ledger adds up to {ledger}"
                      for email, balance, ledger in unbalanced[:LEDGER_NAMED])
    more = len(unbalanced) - LEDGER_NAMED
    yield Finding(PROBLEM, "ledger", f"{len(unbalanced)} account(s) differ from their ledger:"
                  f" {named}" + (f"; and {more} more" if more > 0 else "")
                  + ". Every change the appliance makes writes a ledger row, so these were"
                  " changed another way (raw SQL?): find out how, then correct the balance or"
                  " restore a backup")


def _shared_with(path: Path) -> str | None:
    """Who besides the owner may read the file or enter the folder; None: nobody."""
    status = path.stat()
    if status.st_mode & 0o007:
        return "every user of this machine"
    if status.st_mode & 0o070 and _group_has_others(status):
        try:
            group = grp.getgrgid(status.st_gid).gr_name
        except KeyError:
            group = str(status.st_gid)
        return f"the group {group}"
    return None


def _group_has_others(status: os.stat_result) -> bool:
    # The owner's own group with nobody else in it (as systemd's StateDirectoryMode=0750
    # leaves the service's folder) shares nothing.
    try:
        owner = pwd.getpwuid(status.st_uid)
        members = grp.getgrgid(status.st_gid).gr_mem
    except KeyError:  # a user or group without a name: cannot tell who is in it
        return True
    return owner.pw_gid != status.st_gid or any(name != owner.pw_name for name in members)


def check_permissions(config: Config) -> Iterator[Finding]:
    database = config.storage.database
    places = [(config.storage.data_dir, 700), (config.images_dir, 700), (config.secret_file, 600)]
    if isinstance(database, Path):  # in cluster mode the database's files are the server's
        places += [(database, 600), (Path(f"{database}-wal"), 600),
                   (Path(f"{database}-shm"), 600)]
    found = False
    for path, mode in places:
        if not path.exists():
            continue
        who = _shared_with(path)
        if who:
            found = True
            yield Finding(WARNING, "files", f"{path} is open to {who} (mode"
                          f" {path.stat().st_mode & 0o777:04o}); it holds accounts' data:"
                          f" chmod {mode} {path}")
    if not found:
        yield Finding(OK, "files", "no other user can read the data folder, the database or"
                      " the secret")


def check_service(config: Config) -> Iterator[Finding]:
    pid = holder(config.storage.data_dir)
    if pid is None:
        yield Finding(NOTE, "service", "the service is not running on this data folder")
        return
    host = config.server.host
    host = "127.0.0.1" if host in ("0.0.0.0", "") else "::1" if host == "::" else host
    scheme = "https" if config.server.tls_certificate.strip() else "http"
    url = f"{scheme}://{'[' + host + ']' if ':' in host else host}:{config.server.port}/readyz"
    # The probe sends nothing secret and reads only whether the service is ready, on
    # this machine, by address: a certificate made for the machine's names need not match.
    unverified = None
    if scheme == "https":
        unverified = ssl.create_default_context()
        unverified.check_hostname = False
        unverified.verify_mode = ssl.CERT_NONE
    try:
        with urllib.request.urlopen(url, timeout=5, context=unverified) as response:
            response.read()
        yield Finding(OK, "service", f"running (pid {pid}) and ready at {url}")
    except urllib.error.HTTPError as exc:
        try:
            why = json.loads(exc.read()).get("error", exc.reason)
        except ValueError:
            why = exc.reason
        yield Finding(PROBLEM, "service", f"running (pid {pid}) but not ready: {why}")
    except OSError as exc:
        yield Finding(PROBLEM, "service", f"running (pid {pid}) but {url} does not answer: {exc}")


CHECKS = (check_config, check_gpu, check_models, check_database, check_permissions,
          check_service)


def diagnose(config: Config, load_models: bool = False) -> list[Finding]:
    findings: list[Finding] = []
    for check in CHECKS + ((check_models_load,) if load_models else ()):
        try:
            findings.extend(check(config))
        except Exception as exc:  # noqa: BLE001 - one broken check must not hide the others
            findings.append(Finding(PROBLEM, check.__name__.removeprefix("check_"),
                                    f"the check itself failed: {type(exc).__name__}: {exc}"))
    return findings
