"""The admins' system page: the engine, the queue, the models, the disk and the database, live.

The same figures as /metrics, in words and small charts. The page renders
whole without script; static/system.js refreshes its figures from
/console/admin/system.json every few seconds.
"""

from __future__ import annotations

import contextlib
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from litestar import Controller, Request, get
from litestar.response import Template
from markupsafe import Markup

from appliance.accounts.accounts import Account
from appliance.accounts.service import AccountService
from appliance.core.config import Config
from appliance.core.numbers import size_text
from appliance.core.version import package_version
from appliance.engine.engine import Engine
from appliance.engine.metrics import EngineStatus, ImageRate, WorkerStatus
from appliance.jobs.catalog import Catalog
from appliance.web.console.charts import Bar, column_chart
from appliance.web.console.rendering import page
from appliance.web.console.security import admins_only
from appliance.web.dependencies import Accounts, EngineDependency, Models, Settings
from appliance.web.health import existing_folder

# How often system.js asks for fresh figures; it reads this from the page.
REFRESH_SECONDS = 5
SPARKLINE = "sparkline"


def rate_text(images: int, seconds: int) -> str:
    return f"{images / seconds:.2f} images/s ({images} in {seconds // 60} min)"


def worker_state(worker: WorkerStatus) -> str:
    if not worker.alive:
        return "stopped"
    if not worker.ready:
        return "loading the model"
    return "busy" if worker.busy else "idle"


def batch_text(worker: WorkerStatus) -> str:
    settings = worker.batch_settings
    if worker.batch_size is None or settings is None:
        return "none"
    more = (f" (+{worker.batches_in_flight - 1} more being saved)"
            if worker.batches_in_flight > 1 else "")
    return (f"{worker.batch_size} images, {settings.width}x{settings.height}, {settings.steps}"
            f" steps, guidance {settings.guidance_scale:g}{more}")


def held_models_text(worker: WorkerStatus) -> str:
    return ", ".join(f"{name} ({size_text(size)})" for name, size in worker.models) or "none"


def budget_text(worker: WorkerStatus) -> str:
    # The budget is worked out at the worker's first load.
    return "not known yet" if worker.model_budget_bytes is None else size_text(
        worker.model_budget_bytes)


def installed_models(catalog: Catalog, status: EngineStatus) -> list[dict[str, Any]]:
    """Every installed model, with the workers that hold it now."""
    held_by = status.holders()
    return [{
        "name": model.name, "default": model.name == catalog.default_name,
        "pipeline": model.pipeline, "creditsPerImage": model.credits_per_image,
        "loadedOn": held_by.get(model.name, []), "problem": model.problem,
        "loadedText": ", ".join(held_by.get(model.name, [])) or "not loaded",
    } for model in catalog.models()]


def file_size(path: Path) -> int:
    """A SQLite database's size on disk: the file and its write-ahead log, when there is one."""
    total = 0
    for part in (path, path.with_name(path.name + "-wal")):
        with contextlib.suppress(FileNotFoundError):
            total += part.stat().st_size
    return total


def minute_bars(per_minute: tuple[int, ...]) -> list[Bar]:
    count = len(per_minute)
    return [Bar(images, f"{images} images {count - 1 - i} to {count - i} min ago")
            for i, images in enumerate(per_minute)]


def sparkline(per_minute: tuple[int, ...]) -> Markup:
    return column_chart(minute_bars(per_minute), name=SPARKLINE, height=60,
                        summary=f"Images made each minute over the last hour:"
                                f" {sum(per_minute)} in all")


@dataclass(frozen=True)
class SystemFigures:
    """Everything the page shows, as JSON (`data`) and as the words on the page (`text`)."""

    data: dict[str, Any]
    text: dict[str, str]
    status: EngineStatus


def system_figures(engine: Engine, config: Config, accounts: AccountService,
                   catalog: Catalog) -> SystemFigures:
    status = engine.status()
    workers = [{
        "name": worker.name, "device": worker.device, "state": worker_state(worker),
        "busy": worker.busy, "maxBatchSize": worker.max_batch_size,
        "batchesInFlight": worker.batches_in_flight, "batchText": batch_text(worker),
        "batch": None if worker.batch_settings is None else {
            "size": worker.batch_size, "width": worker.batch_settings.width,
            "height": worker.batch_settings.height, "steps": worker.batch_settings.steps,
            "guidanceScale": worker.batch_settings.guidance_scale},
        "models": [{"name": name, "bytes": size} for name, size in worker.models],
        "modelBudgetBytes": worker.model_budget_bytes,
        "modelsText": held_models_text(worker), "budgetText": budget_text(worker),
    } for worker in status.workers]
    memory: dict[str, dict[str, float]] = {}
    for device, kind, value in status.gpu_memory:
        memory.setdefault(device, {})[f"{kind}Bytes"] = value
    gpus: list[dict[str, Any]] = [{"device": device, **kinds} for device, kinds in memory.items()]
    gpu_text = "; ".join(f"{device}: {size_text(kinds['totalBytes'] - kinds['freeBytes'])} of"
                         f" {size_text(kinds['totalBytes'])} used"
                         for device, kinds in memory.items())
    waiting = sorted(status.queue_by_account.items(), key=lambda item: (-item[1], item[0]))
    by_account = [{"email": accounts.get(account_id).email, "images": images}
                  for account_id, images in waiting]
    data_dir = config.storage.data_dir
    disk = shutil.disk_usage(existing_folder(data_dir))
    database = config.storage.database
    database_size = file_size(database) if isinstance(database, Path) else None
    minute, hour = status.images_last_minute, status.images_last_hour
    model_state = ("could not be loaded: " + str(engine.load_error) if engine.load_error
                   else "loading" if engine.loading else "loaded")
    data = {
        "version": package_version(),
        "ready": status.ready,
        "heartbeatAgeSeconds": round(status.heartbeat_age_seconds, 1),
        "model": {"path": str(config.model.path), "dtype": config.model.dtype,
                  "device": config.model.device, "state": model_state},
        "workers": workers,
        "models": installed_models(catalog, status),
        "gpu": {"cuda": bool(gpus), "devices": gpus},
        "images": {"lastMinute": minute, "lastHour": hour,
                   "perSecondLastMinute": round(minute / ImageRate.MINUTE, 3),
                   "perSecondLastHour": round(hour / ImageRate.SECONDS, 3),
                   "perMinute": list(status.images_per_minute)},
        "queue": {"depth": status.queue_depth, "capacity": engine.queue.capacity,
                  "byAccount": by_account},
        "disk": {"path": str(data_dir), "freeBytes": disk.free, "totalBytes": disk.total},
        "database": {"path": str(database), "sizeBytes": database_size},
    }
    text = {
        "version": package_version(),
        "ready": "ready" if status.ready else "not ready",
        "model": f"{config.model.path} ({model_state})",
        "model-dtype": config.model.dtype,
        "model-device": config.model.device,
        "gpu": gpu_text or "CPU only: no CUDA device in use",
        "rate-minute": rate_text(minute, ImageRate.MINUTE),
        "rate-hour": rate_text(hour, ImageRate.SECONDS),
        "queue-depth": f"{status.queue_depth} of {engine.queue.capacity} places",
        "disk": f"{size_text(disk.free)} free of {size_text(disk.total)}",
        "database": (size_text(database_size) if database_size is not None
                     else f"PostgreSQL, {database}"),
        "heartbeat": f"{status.heartbeat_age_seconds:.1f} s ago",
    }
    return SystemFigures({**data, "text": text}, text, status)


class SystemPages(Controller):
    path = "/admin"
    guards = [admins_only]
    include_in_schema = False

    @get("/system", name="console.admin.system", sync_to_thread=True)
    def system(self, request: Request[Account, Any, Any], engine: EngineDependency,
               config: Settings, accounts: Accounts, catalog: Models) -> Template:
        figures = system_figures(engine, config, accounts, catalog)
        return page(request, "system.html", figures=figures.data, text=figures.text,
                    sparkline=sparkline(figures.status.images_per_minute),
                    model_dir=config.models_dir,
                    refresh_seconds=REFRESH_SECONDS)

    @get("/system.json", sync_to_thread=True)
    def system_json(self, engine: EngineDependency, config: Settings, accounts: Accounts,
                    catalog: Models) -> dict[str, Any]:
        return system_figures(engine, config, accounts, catalog).data
