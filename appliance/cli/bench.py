"""`appliance bench`: the plain diffusers loop against the appliance, on one model.

Every appliance setting comes from the config file, changed with `--set
section.key=value` or a shorthand such as `--steps 1` (generation.steps): the
shorthands only name settings, whose types, bounds and help are those of
their declaration in core/config.py.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import click

from appliance.cli.common import WHOLE_NUMBER, CommandError, pass_config
from appliance.core.config import Config, ConfigError, declared

# Shorthand option -> the setting it sets.
SHORTHANDS = {
    "model": "model.path",
    "device": "model.device",
    "devices": "engine.devices",
    "dtype": "model.dtype",
    "width": "generation.width",
    "height": "generation.height",
    "steps": "generation.steps",
    "guidance": "generation.guidance_scale",
    "batch_size": "engine.batch_size",
    "batch_window": "engine.batch_window_seconds",
    "compile": "engine.compile",
    "vae_decode_chunk": "engine.vae_decode_chunk",
    "tiny_vae": "engine.tiny_vae",
    "png_compress_level": "engine.png_compress_level",
    "png_threads": "engine.png_threads",
}
# Folders given on the command line are relative to where it runs, not to the config file.
PATH_SHORTHANDS = {"model", "tiny_vae"}


def _shorthand_options(command: Callable[..., None]) -> Callable[..., None]:
    for name, key in reversed(SHORTHANDS.items()):
        setting = declared(key)
        first_sentence = setting.help.split(". ")[0].rstrip(".")
        command = click.option(f"--{name.replace('_', '-')}", metavar="VALUE",
                               help=f"sets {key}: {first_sentence}")(command)
    return command


def assignments(shorthands: dict[str, str | None], sets: tuple[str, ...]) -> list[str]:
    """Every setting the command line changes, as "section.key=value"; --set comes last."""
    given = []
    for name, value in shorthands.items():
        if value is None:
            continue
        if name in PATH_SHORTHANDS and value:
            value = str(Path(value).resolve())
        given.append(f"{SHORTHANDS[name]}={value}")
    return [*given, *sets]


@click.command("bench")
@click.option("--set", "sets", multiple=True, metavar="SECTION.KEY=VALUE",
              help="change one setting of the config file for both sides, e.g."
                   " --set engine.batch_size=16 (repeatable; paths relative to the config file)")
@_shorthand_options
@click.option("--images", type=WHOLE_NUMBER, default=64, metavar="N",
              help="images the appliance makes (default: 64)")
@click.option("--baseline-images", type=WHOLE_NUMBER, default=8, metavar="N",
              help="images the plain loop makes (default: 8)")
@click.option("--clients", type=WHOLE_NUMBER, default=4, metavar="N",
              help="concurrent clients, an account each (default: 4)")
@click.option("--job-size", type=WHOLE_NUMBER, default=8, metavar="N",
              help="prompts per job (default: 8)")
@click.option("--poll-seconds", type=float, default=1.0, metavar="SECONDS",
              help="how often each client asks for its job's status (default: 1, as"
                   " the README's examples)")
@click.option("--peak-tflops", type=float, default=790.0, metavar="TFLOPS",
              help="the GPU's dense half-precision peak, for the compute fraction"
                   " (default: 790, an H100 or H200 SXM)")
@click.option("--json", "json_file", type=click.Path(path_type=Path), metavar="FILE",
              help="results file (default: bench/results/<time>.json)")
@click.option("--markdown", type=click.Path(path_type=Path), default=Path("BENCHMARKS.md"),
              metavar="FILE", help="table to append a row to (default: BENCHMARKS.md)")
@click.option("--no-record", is_flag=True, help="only print the figures")
@pass_config
def bench(config: Config, sets: tuple[str, ...], images: int, baseline_images: int,
          clients: int, job_size: int, poll_seconds: float, peak_tflops: float,
          json_file: Path | None, markdown: Path, no_record: bool, **shorthands: Any) -> None:
    """time the plain diffusers loop against the appliance end to end, on the same model and
    settings (the config file's, changed with --set or the shorthands); see BENCHMARKS.md"""
    from appliance.bench import (
        BenchOptions,
        append_markdown,
        bench_config,
        check_options,
        report_lines,
        run_benchmark,
    )

    changes = assignments(shorthands, sets)
    try:
        settings = bench_config(config.source, changes)
    except ConfigError as exc:
        raise CommandError(str(exc)) from None
    options = BenchOptions(settings, images, baseline_images, clients, job_size, peak_tflops,
                           poll_seconds)
    problem = check_options(options)
    model = settings.model.path
    if any(change.startswith("model.path=") for change in changes) \
            and not (model / "model_index.json").is_file():
        # Only the configured model.path is made (the demo model) when missing.
        problem = f"{model} is not a diffusers model folder (no model_index.json)"
    if problem:
        raise CommandError(problem)
    # Each request would otherwise be logged at INFO among the figures.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        result = run_benchmark(options)
    except RuntimeError as exc:
        raise CommandError(f"the benchmark failed: {exc}") from None
    for line in report_lines(result):
        click.echo(line)
    if not no_record:
        path = json_file or Path("bench/results") / (
            datetime.now().strftime("%Y%m%d-%H%M%S") + f"-{result['architecture']}.json")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2) + "\n")
        append_markdown(markdown, result)
        click.echo(f"results: {path}; a row was added to {markdown}")


@click.command("bench-api")
@click.option("--seconds", type=WHOLE_NUMBER, default=10, metavar="N",
              help="how long wrk loads each route (default: 10)")
@click.option("--connections", type=WHOLE_NUMBER, default=16, metavar="N",
              help="wrk's open connections (default: 16)")
@click.option("--posts", type=WHOLE_NUMBER, default=20, metavar="N",
              help="100-prompt POSTs timed one after another (default: 20)")
@click.option("--rounds", type=WHOLE_NUMBER, default=3, metavar="N",
              help="times each route is loaded, in rotating order; the median counts"
                   " (default: 3)")
@click.option("--json", "json_file", type=click.Path(path_type=Path), metavar="FILE",
              help="also write the figures to FILE as JSON")
@pass_config
def bench_api(config: Config, seconds: int, connections: int, posts: int, rounds: int,
              json_file: Path | None) -> None:
    """time the HTTP API's own overhead against a bare Litestar route, with wrk: a job's
    status, an image download, /healthz and 100-prompt POSTs; see BENCHMARKS.md"""
    from appliance.bench.http import report_lines, run_api_benchmark

    if min(seconds, connections, posts, rounds) < 1:
        raise CommandError("--seconds, --connections, --posts and --rounds must be at least 1")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    _run_and_report(lambda: run_api_benchmark(config, seconds, connections, posts, rounds),
                    report_lines, json_file)


def _run_and_report(run: Callable[[], dict[str, Any]],
                    report_lines: Callable[[dict[str, Any]], list[str]],
                    json_file: Path | None) -> None:
    """Runs a benchmark; prints its report and writes its figures (when asked)."""
    try:
        result = run()
    except RuntimeError as exc:
        raise CommandError(f"the benchmark failed: {exc}") from None
    for line in report_lines(result):
        click.echo(line)
    if json_file:
        json_file.write_text(json.dumps(result, indent=2) + "\n")


def _counts(text: str) -> tuple[int, ...]:
    """"2,8,32" as (2, 8, 32); a CommandError naming the problem otherwise."""
    try:
        counts = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise CommandError(f"{text!r} is not a comma-separated list of whole numbers") from None
    if min(counts) < 1:
        raise CommandError(f"{text!r}: each count must be at least 1")
    return counts


@click.command("bench-cluster")
@click.option("--database-url", required=True, metavar="URL",
              help="a scratch PostgreSQL database, postgresql://USER:PASSWORD@HOST:PORT/DBNAME:"
                   " the benchmark applies the schema and writes test accounts, jobs and"
                   " nodes into it, so never point it at a database that serves")
@click.option("--seconds", type=WHOLE_NUMBER, default=10, metavar="N",
              help="how long each measure runs (default: 10)")
@click.option("--claimers", default="2,8,32", metavar="N,N,...",
              help="concurrent claimers, a run for each (default: 2,8,32)")
@click.option("--batch", default="8,32", metavar="N,N,...",
              help="images a claim asks for, a run for each (default: 8,32)")
@click.option("--queued", type=WHOLE_NUMBER, default=1000, metavar="N",
              help="images kept waiting while the claimers take them (default: 1000,"
                   " engine.queue_capacity's default)")
@click.option("--no-admission", is_flag=True,
              help="skip the admission measure (the real nodes and wrk)")
@click.option("--json", "json_file", type=click.Path(path_type=Path), metavar="FILE",
              help="also write the figures to FILE as JSON")
@pass_config
def bench_cluster(config: Config, database_url: str, seconds: int, claimers: str, batch: str,
                  queued: int, no_admission: bool, json_file: Path | None) -> None:
    """time the cluster's shared queue on PostgreSQL: claims a second against one node's
    in-memory queue, and one-image POSTs through 2 nodes against 1 node on SQLite; it WRITES
    test data into the database it is given; see BENCHMARKS.md"""
    from appliance.bench.cluster import report_lines, run_cluster_benchmark
    from appliance.core.database_url import DatabaseUrl, looks_like_url

    if not looks_like_url(database_url):
        raise CommandError("--database-url must be a postgresql:// URL of a scratch database")
    try:
        url = DatabaseUrl(database_url)
    except ValueError as exc:
        raise CommandError(f"--database-url {exc}") from None
    if min(seconds, queued) < 1:
        raise CommandError("--seconds and --queued must be at least 1")
    claimer_counts, batches = _counts(claimers), _counts(batch)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    _run_and_report(lambda: run_cluster_benchmark(config, url, seconds, claimer_counts, batches,
                                                  queued, admission=not no_admission),
                    report_lines, json_file)


@click.command("bench-models")
@click.option("--size", type=click.Choice(["tiny", "sd15"]), default="tiny",
              help="the two models' architecture, random weights (default: tiny)")
@click.option("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
@click.option("--width", type=WHOLE_NUMBER, default=256, metavar="PX",
              help="image width and height (default: 256)")
@click.option("--steps", type=WHOLE_NUMBER, default=8, help="denoising steps (default: 8)")
@click.option("--batch-size", type=WHOLE_NUMBER, default=8, help="engine.batch_size (default: 8)")
@click.option("--images", type=WHOLE_NUMBER, default=96, metavar="N",
              help="images in each run (default: 96)")
@click.option("--job-size", type=WHOLE_NUMBER, default=8, metavar="N",
              help="prompts per job (default: 8)")
@click.option("--swap-seconds", type=float, default=2.0, metavar="SECONDS",
              help="engine.model_swap_seconds in the run that swaps (default: 2)")
@click.option("--loads", type=WHOLE_NUMBER, default=3, metavar="N",
              help="times each model's load is timed (default: 3)")
@click.option("--rounds", type=WHOLE_NUMBER, default=3, metavar="N",
              help="times each run is made, in rotating order; the median counts (default: 3)")
@click.option("--json", "json_file", type=click.Path(path_type=Path), metavar="FILE",
              help="where the JSON goes (default: bench/results/DATE-models-SIZE.json)")
def bench_models(size: str, device: str, width: int, steps: int, batch_size: int, images: int,
                 job_size: int, swap_seconds: float, loads: int, rounds: int,
                 json_file: Path | None) -> None:
    """time a model swap, and the engine's throughput with two models against one; see
    BENCHMARKS.md"""
    from appliance.bench.models import report_lines, run_models_benchmark

    if min(width, steps, batch_size, images, job_size, loads, rounds) < 1:
        raise CommandError("--width, --steps, --batch-size, --images, --job-size, --loads and"
                           " --rounds must be at least 1")
    try:
        result = run_models_benchmark(size, device, width, steps, batch_size, images, job_size,
                                      swap_seconds, loads, rounds)
    except RuntimeError as exc:
        raise CommandError(f"the benchmark failed: {exc}") from None
    for line in report_lines(result):
        click.echo(line)
    path = json_file or Path("bench/results") / (
        datetime.now().strftime("%Y%m%d-%H%M%S") + f"-models-{size}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    click.echo(f"results: {path}")
