"""`appliance bench`: the plain diffusers loop against the appliance, on one model."""

from __future__ import annotations

import json
import logging
from datetime import datetime
from pathlib import Path
from typing import Any

import click

from appliance.cli.common import WHOLE_NUMBER, CommandError, pass_config
from appliance.core.config import Config


@click.command("bench")
@click.option("--model", type=click.Path(path_type=Path), metavar="DIR",
              help="model folder (default: model.path)")
@click.option("--device", help="auto, cpu, cuda or cuda:N (default: model.device)")
@click.option("--devices", help="the appliance's GPUs: all, or cuda:0,cuda:1,..."
                                " (default: engine.devices)")
@click.option("--dtype", type=click.Choice(["auto", "float32", "float16", "bfloat16"]),
              help="the weights' precision (default: model.dtype)")
@click.option("--width", type=WHOLE_NUMBER, help="pixels (default: generation.width)")
@click.option("--height", type=WHOLE_NUMBER, help="pixels (default: generation.height)")
@click.option("--steps", type=WHOLE_NUMBER, help="denoising steps (default: generation.steps)")
@click.option("--guidance", type=float, metavar="SCALE",
              help="guidance scale (default: generation.guidance_scale)")
@click.option("--batch-size", type=WHOLE_NUMBER, metavar="N",
              help="images per batch (default: engine.batch_size)")
@click.option("--batch-window", type=float, metavar="SECONDS",
              help="how long a batch waits to fill (default: engine.batch_window_seconds)")
@click.option("--compile", type=click.Choice(["off", "default", "reduce-overhead", "max-autotune",
                                              "max-autotune-no-cudagraphs"]),
              help="torch.compile mode (default: engine.compile)")
@click.option("--vae-decode-chunk", type=WHOLE_NUMBER, metavar="N",
              help="images the VAE decodes at once (default: engine.vae_decode_chunk)")
@click.option("--tiny-vae", type=click.Path(resolve_path=True), metavar="DIR",
              help="a folder with an AutoencoderTiny")
@click.option("--png-compress-level", type=WHOLE_NUMBER, metavar="LEVEL",
              help="0 to 9 (default: engine.png_compress_level)")
@click.option("--png-threads", type=WHOLE_NUMBER, metavar="N",
              help="threads encoding PNGs (default: engine.png_threads)")
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
def bench(config: Config, model: Path | None, devices: str | None, json_file: Path | None,
          markdown: Path, no_record: bool, **overrides: Any) -> None:
    """time the plain diffusers loop against the appliance end to end, on the same model and
    settings (defaults: the config's); see BENCHMARKS.md"""
    from appliance.bench import (
        append_markdown,
        check_options,
        options_from,
        report_lines,
        run_benchmark,
    )

    gpus: str | tuple[str, ...] | None = devices
    if devices and devices != "all":
        gpus = tuple(name.strip() for name in devices.split(",") if name.strip())
    options = options_from(config, model=model, devices=gpus, **overrides)
    problem = check_options(options)
    if model and not (model / "model_index.json").is_file():
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
