"""`appliance bench-models`: what serving several models costs.

1. The cost of a swap: each model's load (from disk onto the device, warm-up
   included), timed `loads` times.
2. Throughput: the same images as jobs from two accounts, through the real
   engine (the job service, queue, worker and PNG writers of `appliance serve`,
   without HTTP), in three runs:
   - one model: every job for model A (the baseline);
   - two models, both loaded: jobs alternate between A and B, the budget fits both;
   - two models, one at a time: the same jobs, a budget that fits one model, so
     the worker swaps, at most once per engine.model_swap_seconds.
   Each runs `rounds` times, in a rotating order; its median round is reported.
The two models have the same architecture and different weights, so the runs
differ only in what serving two models costs.
"""

from __future__ import annotations

import contextlib
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from appliance.accounts import accounts, audit
from appliance.bench import bench_prompts
from appliance.core.config import Config, config_from_dict
from appliance.engine.loaded_models import weights_on_disk
from appliance.engine.synth import synthesize
from appliance.jobs import parameters
from appliance.jobs.service import JobRequest
from appliance.services import Services

MODELS = ("model-a", "model-b")
# Accounts submitting at once; the queue gives them turns, as in production.
ACCOUNTS = 2


def bench_models_config(work: Path, run: str, device: str, width: int, steps: int,
                        batch_size: int, budget: str, swap_seconds: float) -> Config:
    """The config of one run, with a data folder of its own."""
    data = work / f"data-{run}"
    return config_from_dict({
        "storage": {"data_dir": str(data), "database": str(data / "appliance.db")},
        "model": {"dir": str(work / "models"), "path": str(work / "models" / MODELS[0]),
                  "device": device},
        "generation": {"width": width, "height": width, "steps": steps},
        "engine": {"batch_size": batch_size, "gpu_memory_budget": budget,
                   "model_swap_seconds": swap_seconds, "queue_capacity": 100_000},
    }, base_dir=work)


@contextlib.contextmanager
def running(config: Config) -> Iterator[Services]:
    services = Services.build(config)
    services.engine.start()
    try:
        deadline = time.monotonic() + 3600
        while not services.engine.ready:
            if services.engine.load_error is not None:
                raise RuntimeError(f"the model could not be loaded: {services.engine.load_error}")
            if time.monotonic() > deadline:
                raise RuntimeError("the engine did not become ready within an hour")
            time.sleep(0.05)
        yield services
    finally:
        services.engine.stop()
        services.database.close()


def timed_run(config: Config, models: list[str], images: int, job_size: int) -> dict[str, Any]:
    """Jobs of `job_size` images, their models in turn from `models`, from ACCOUNTS
    accounts at once; the clock runs from the first submit until every image is saved."""
    with running(config) as services:
        owners = [accounts.create_account(services.database.db(), f"bench{n}@example.com",
                                          "correct horse battery", audit.Actor.cli(),
                                          credits=images).id for n in range(ACCOUNTS)]
        prompts = bench_prompts(images)
        started = time.perf_counter()
        jobs = []
        for number, first in enumerate(range(0, images, job_size)):
            model = services.catalog.model(models[number % len(models)])
            settings = parameters.settings_for(config.generation, config.limits, {}, model)
            owner = owners[number % ACCOUNTS]
            submitted = services.jobs.submit(JobRequest(
                owner, None, prompts[first:first + job_size], settings))
            jobs.append((owner, submitted.job_id))
        for owner, job_id in jobs:
            while not services.jobs.read(owner, job_id).status.finished:
                time.sleep(0.02)
        seconds = time.perf_counter() - started
        made = sum(services.jobs.read(owner, job_id).completed_images for owner, job_id in jobs)
        if made != images:
            raise RuntimeError(f"{images - made} of {images} images failed")
        held = services.engine.workers[0].models
        return {"images": images, "seconds": round(seconds, 3),
                "images_per_second": round(images / seconds, 3),
                "loads": held.loads, "unloads": held.unloads,
                "load_seconds": round(held.load_seconds, 3)}


def load_times(config: Config, loads: int) -> dict[str, list[float]]:
    """Seconds each model's load took, `loads` times over, on the configured device."""
    from appliance.engine.diffusers_generator import load_configured_generator
    from appliance.jobs.catalog import Catalog

    catalog = Catalog(config)
    times: dict[str, list[float]] = {}
    for _ in range(loads):
        for name in MODELS:
            started = time.perf_counter()
            generator = load_configured_generator(config, None, catalog.served(name))
            times.setdefault(name, []).append(round(time.perf_counter() - started, 3))
            del generator
    return times


def run_models_benchmark(size: str, device: str, width: int, steps: int, batch_size: int,
                         images: int, job_size: int, swap_seconds: float,
                         loads: int, rounds: int = 3) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-models-") as folder:
        work = Path(folder)
        for seed, name in enumerate(MODELS):
            synthesize(work / "models" / name, size, seed=seed)
        one_model = weights_on_disk(work / "models" / MODELS[0], "float32")

        def config(run: object, budget: str) -> Config:
            return bench_models_config(work, str(run), device, width, steps, batch_size,
                                       budget, swap_seconds)

        # Room for one model and a half in the last run: loading the other unloads it.
        plan = [("one model", "90%", [MODELS[0]]),
                ("two models, both loaded", "90%", list(MODELS)),
                ("two models, one at a time", f"{one_model * 3 // 2}B", list(MODELS))]
        # Untimed: the process's first images pay for torch's own start-up.
        timed_run(config(0, "90%"), [MODELS[0]], job_size, job_size)
        # Each round runs the three in another order, so that a load that comes and goes
        # on the machine falls on each of them alike; a run's figure is its median round.
        rounds_of: dict[str, list[dict[str, Any]]] = {name: [] for name, _, _ in plan}
        for round_number in range(rounds):
            for offset in range(len(plan)):
                number = (round_number + offset) % len(plan)
                name, budget, models = plan[number]
                run_folder = f"{round_number + 1}-{number}"
                rounds_of[name].append(timed_run(config(run_folder, budget), models, images,
                                                 job_size))
        runs = {name: {**sorted(results, key=lambda run: run["images_per_second"])[
                    len(results) // 2], "rounds": [run["images_per_second"] for run in results]}
                for name, results in rounds_of.items()}
        return {"size": size, "device": resolved_device(device), "width": width,
                "steps": steps,
                "batch_size": batch_size, "job_size": job_size, "swap_seconds": swap_seconds,
                "weights_bytes": one_model, "rounds": rounds,
                "load_seconds": load_times(config("loads", "90%"), loads), "runs": runs}


def resolved_device(device: str) -> str:
    from appliance.engine.pipeline import pick_device

    return pick_device(device)


def report_lines(result: dict[str, Any]) -> list[str]:
    lines = [f"models: two {result['size']} pipelines ({result['weights_bytes'] / 2**20:.1f} MiB"
             f" of weights each) on {result['device']}, {result['width']}x{result['width']},"
             f" {result['steps']} steps, batches of {result['batch_size']}, jobs of"
             f" {result['job_size']}"]
    for name, seconds in result["load_seconds"].items():
        lines.append(f"load (swap cost) of {name}: median {statistics.median(seconds):.2f} s"
                     f" over {len(seconds)} loads ({', '.join(f'{s:.2f}' for s in seconds)})")
    baseline = result["runs"]["one model"]["images_per_second"]
    for name, run in result["runs"].items():
        rate = run["images_per_second"]
        lines.append(f"{name}: {run['images']} images in {run['seconds']:.1f} s ="
                     f" {rate:.2f} images/s ({rate / baseline:.2f}x one model; median of"
                     f" {', '.join(f'{r:.2f}' for r in run['rounds'])});"
                     f" {run['loads']} loads, {run['unloads']} unloads,"
                     f" {run['load_seconds']:.1f} s loading")
    return lines
