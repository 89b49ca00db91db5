"""`appliance bench`: the plain diffusers loop against the appliance, same model and settings.

1. The baseline (baseline.py) generates `baseline_images` images one call at a
   time, in a process of its own.
2. A real `appliance serve` (serving.py), with its data in a temporary folder,
   gets `images` prompts as bulk jobs of `job_size` from `clients` concurrent
   clients.
Both run the same model folder, size, steps, guidance, dtype and device(s), and
save PNGs at the same compression level. The figures are printed, written as
JSON and appended as a row to a Markdown table.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from appliance.bench import serving
from appliance.core.config import (
    Config,
    apply_assignments,
    config_from_dict,
    declared,
    read_config_file,
)
from appliance.core.devices import ALL, resolve_devices
from appliance.engine.gpu import cuda_devices

# Multiply-adds counted twice: one SD 1.5 UNet forward on one 64x64 latent
# (a 512x512 image), and one VAE decode of a 512x512 image.
SD15_UNET_TFLOP = 0.80
SD15_VAE_DECODE_TFLOP = 2.5

SUBJECTS = ["a lighthouse", "a red fox", "an old library", "a mountain lake", "a city street",
            "a bowl of fruit", "a sailing boat", "a desert road", "a snowy forest", "a robot"]
STYLES = ["at sunset, oil painting", "in the rain, photograph", "watercolor",
          "at night, cinematic lighting", "in the morning fog, highly detailed"]


@dataclass(frozen=True)
class BenchOptions:
    """What the benchmark decides itself. The model, image and engine settings are the
    config's (bench_config), so both sides run exactly what the appliance would."""

    config: Config
    images: int
    baseline_images: int
    clients: int
    job_size: int
    peak_tflops: float
    poll_seconds: float = 1.0
    startup_timeout: float = 3600.0


def bench_config(source: Path | None, assignments: list[str]) -> Config:
    """The config file's settings (none: the defaults) with `assignments`
    ("section.key=value") applied, and room for whatever defaults they ask for."""
    raw, base_dir, found = read_config_file(source)
    raw = apply_assignments(raw, assignments)
    # The server takes requests within the widest bounds the declaration allows, so
    # that any default size, step count or guidance asked for here is one it accepts.
    generation = raw.setdefault("generation", {})
    for low, high, of in (("min_size", "max_size", "generation.width"),
                          ("min_steps", "max_steps", "generation.steps"),
                          ("min_guidance_scale", "max_guidance_scale",
                           "generation.guidance_scale")):
        bounds = declared(of).bounds
        assert bounds is not None
        generation[low], generation[high] = bounds.low, bounds.high
    return config_from_dict(raw, base_dir=base_dir, source=found)


def bench_prompts(count: int) -> list[str]:
    # Distinct prompts, as real bulk jobs have; nothing is cached between them anyway.
    return [f"{SUBJECTS[i % len(SUBJECTS)]} {STYLES[(i // len(SUBJECTS)) % len(STYLES)]}, #{i}"
            for i in range(count)]


def architecture(model: Path) -> str:
    """sd15, tiny (the demo model) or other, from the UNet's shape."""
    try:
        unet = json.loads((model / "unet" / "config.json").read_text())
    except (OSError, ValueError):
        return "other"
    channels = list(unet.get("block_out_channels", []))
    if channels == [320, 640, 1280, 1280] and unet.get("cross_attention_dim") == 768:
        return "sd15"
    if channels == [16, 32, 32]:
        return "tiny"
    return "other"


def tflop_per_image(config: Config) -> float | None:
    """The SD 1.5 figures hold at 512x512 only; None elsewhere."""
    generation = config.generation
    if architecture(config.model.path) != "sd15" or (generation.width, generation.height) != (
            512, 512):
        return None
    forwards = generation.steps * (2 if generation.guidance_scale > 1 else 1)
    return forwards * SD15_UNET_TFLOP + SD15_VAE_DECODE_TFLOP


def resolved_devices(config: Config) -> list[str]:
    """The appliance's devices, a worker each, as engine.worker_devices finds them."""
    devices = config.engine.devices
    count = len(cuda_devices()) if devices == ALL else 0
    return resolve_devices(devices, config.model.device, count)


def run_baseline(options: BenchOptions, work: Path) -> dict[str, Any]:
    prompts_file = work / "baseline-prompts.json"
    prompts_file.write_text(json.dumps(bench_prompts(options.baseline_images)))
    config, generation = options.config, options.config.generation
    # The plain loop has one device: the appliance's first.
    command = [sys.executable, "-m", "appliance.bench.baseline",
               "--model", str(config.model.path), "--device", resolved_devices(config)[0],
               "--dtype", config.model.dtype,
               "--width", str(generation.width), "--height", str(generation.height),
               "--steps", str(generation.steps), "--guidance", str(generation.guidance_scale),
               "--compress-level", str(config.engine.png_compress_level),
               "--prompts-file", str(prompts_file), "--out", str(work / "baseline")]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"the baseline failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def section_values(section: Any) -> dict[str, Any]:
    """A config section's settings as a config file writes them."""
    def as_written(value: Any) -> Any:
        if isinstance(value, Path):
            return str(value)
        return list(value) if isinstance(value, tuple) else value

    return {field.name: as_written(getattr(section, field.name))
            for field in dataclasses.fields(section)}


def server_sections(options: BenchOptions, work: Path, port: int) -> dict[str, dict[str, Any]]:
    """The server's config: the benchmark's model, generation and engine settings, its data
    in `work`, room for every job, no per-key throttling."""
    config = options.config
    total = options.images + 1
    engine = section_values(config.engine)
    if config.engine.tiny_vae:
        # The server's config lives in another folder: a relative path would point elsewhere.
        engine["tiny_vae"] = str(config.resolve(config.engine.tiny_vae))
    engine["queue_capacity"] = max(config.engine.queue_capacity, total)
    return {
        "server": {"host": "127.0.0.1", "port": port},
        "storage": {"data_dir": str(work / "data"),
                    "database": str(work / "data" / "appliance.db")},
        "model": section_values(config.model),
        "generation": section_values(config.generation),
        "limits": {"max_prompts_per_request": max(config.limits.max_prompts_per_request,
                                                  options.job_size),
                   "max_pending_images_per_account": total,
                   "requests_per_minute_per_key": 0},
        "engine": engine,
    }


def run_appliance(options: BenchOptions, work: Path) -> dict[str, Any]:
    port = serving.free_port()
    config_path = work / "config.toml"
    serving.write_config(config_path, server_sections(options, work, port))
    (work / "data").mkdir()
    per_client = -(-options.images // options.clients)
    client_keys = serving.make_keys(work / "data" / "appliance.db", options.clients,
                                    credits=per_client + 1)
    prompts = bench_prompts(options.images)
    runs = []
    for index, key in enumerate(client_keys):
        mine = prompts[index::options.clients]
        runs.append(serving.ClientRun(key, [mine[i:i + options.job_size]
                                            for i in range(0, len(mine), options.job_size)]))
    server = serving.Server(config_path, port, work / "serve.log")
    try:
        server.wait_until_up(options.startup_timeout)
        server.wait_until_generating(client_keys[0], options.startup_timeout)
        figures = serving.drive(server, [run for run in runs if run.jobs], work / "data" / "images",
                                options.poll_seconds)
    finally:
        log = server.stop()
    figures["peak_gpu_memory_gib"] = serving.peak_gpu_memory_gib(log)
    return figures


def run_benchmark(options: BenchOptions) -> dict[str, Any]:
    config = options.config
    generation, engine, model = config.generation, config.engine, config.model.path
    # Imported here: it loads torch, which the rest of the benchmark's parent does not need.
    from appliance.engine.diffusers_generator import ensure_model

    ensure_model(model)
    work = Path(tempfile.mkdtemp(prefix="appliance-bench-"))
    try:
        baseline = run_baseline(options, work)
        appliance = run_appliance(options, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    compute = tflop_per_image(config)
    on_cpu = baseline["device"] == "cpu"
    devices = resolved_devices(config)
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
        "device": baseline["device_name"],
        # One device: the one the plain loop found for "auto" too.
        "devices": devices if len(devices) > 1 else [baseline["device"]],
        "model": _shown(model),
        "architecture": architecture(model),
        "pipeline": baseline["pipeline"],
        "dtype": baseline["dtype"],
        "width": generation.width,
        "height": generation.height,
        "steps": generation.steps,
        "guidance_scale": generation.guidance_scale,
        "batch_size": engine.batch_size,
        "batch_window_seconds": engine.batch_window_seconds,
        "compile": engine.compile,
        "tiny_vae": bool(engine.tiny_vae),
        "png_compress_level": engine.png_compress_level,
        "clients": options.clients,
        "job_size": options.job_size,
        "poll_seconds": options.poll_seconds,
        "baseline": baseline,
        "appliance": appliance,
        "ratio": appliance["images_per_second"] / baseline["images_per_second"],
        "compute": None if compute is None or on_cpu else {
            "tflop_per_image": compute,
            "peak_tflops": options.peak_tflops,
            "baseline_fraction": baseline["images_per_second"] * compute / options.peak_tflops,
            "appliance_fraction": appliance["images_per_second"] * compute / options.peak_tflops,
        },
    }


def _shown(path: Path) -> str:
    """The path relative to the current folder when inside it, for results kept in a repository."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _gib(value: float | None) -> str:
    return "n/a on CPU" if value is None else f"{value:.2f} GiB"


def report_lines(result: dict[str, Any]) -> list[str]:
    base, app, compute = result["baseline"], result["appliance"], result["compute"]
    lines = [
        f"model: {result['model']} ({result['architecture']}, {result['pipeline']}),"
        f" {result['dtype']}, on {result['device']}",
        f"settings: {result['width']}x{result['height']}, {result['steps']} steps, guidance"
        f" {result['guidance_scale']:g}",
        f"appliance: batch size {result['batch_size']},"
        f" window {result['batch_window_seconds']:g} s,"
        f" compile {result['compile']}, {len(result['devices'])} device(s), {result['clients']}"
        f" clients, jobs of up to {result['job_size']} prompts, polled every"
        f" {result['poll_seconds']:g} s",
        f"plain diffusers loop: {base['images']} images in {base['seconds']:.1f} s ="
        f" {base['images_per_second']:.3f} images/s",
        f"appliance end to end: {app['completed_images']} images in {app['seconds']:.1f} s ="
        f" {app['images_per_second']:.3f} images/s ({app['failed_images']} failed)",
        f"ratio: {result['ratio']:.2f}x",
        f"job latency: p50 {app['job_latency_p50_s']:.2f} s, p95 {app['job_latency_p95_s']:.2f} s"
        f" ({app['jobs']} jobs)",
        f"peak GPU memory: plain loop {_gib(base['peak_gpu_memory_gib'])},"
        f" appliance {_gib(app['peak_gpu_memory_gib'])}",
    ]
    if app["cpu_seconds"] and app["completed_images"]:
        # Less skewed than wall time where other work shares the CPU.
        loop = base["cpu_seconds"] / base["images"]
        served = app["cpu_seconds"] / app["completed_images"]
        lines.append(f"CPU time per image: plain loop {loop:.3f} s, appliance server"
                     f" {served:.3f} s ({loop / served:.2f}x)")
    if compute is None:
        lines.append("compute fraction: n/a (counted for the SD 1.5 architecture at 512x512"
                     " on a GPU only)")
    else:
        lines.append(
            f"compute fraction: {compute['tflop_per_image']:.1f} TFLOP per image against"
            f" {compute['peak_tflops']:g} TFLOP/s: plain loop {compute['baseline_fraction']:.1%},"
            f" appliance {compute['appliance_fraction']:.1%}")
    return lines


MARKDOWN_HEADER = (
    "| date | device | model | size | steps | guidance | batch | compile | images |"
    " plain loop img/s | appliance img/s | ratio | job p50 s | job p95 s | peak GPU GiB"
    " (loop / appliance) | compute fraction (loop / appliance) |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
)


def markdown_row(result: dict[str, Any]) -> str:
    base, app, compute = result["baseline"], result["appliance"], result["compute"]

    def gib(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.1f}"

    fraction = ("n/a" if compute is None else
                f"{compute['baseline_fraction']:.1%} / {compute['appliance_fraction']:.1%}")
    devices = len(result["devices"])
    device = result["device"] + (f" x{devices}" if devices > 1 else "")
    cells = [
        result["date"][:10], device, f"{result['architecture']} ({result['dtype']})",
        f"{result['width']}x{result['height']}", str(result["steps"]),
        f"{result['guidance_scale']:g}", str(result["batch_size"]), result["compile"],
        f"{app['completed_images']} (loop {base['images']})",
        f"{base['images_per_second']:.3f}", f"{app['images_per_second']:.3f}",
        f"{result['ratio']:.2f}x", f"{app['job_latency_p50_s']:.2f}",
        f"{app['job_latency_p95_s']:.2f}",
        f"{gib(base['peak_gpu_memory_gib'])} / {gib(app['peak_gpu_memory_gib'])}", fraction,
    ]
    return "| " + " | ".join(cells) + " |\n"


def append_markdown(path: Path, result: dict[str, Any]) -> None:
    """Adds a row to the table at the end of `path`, starting the file or the table if need be."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if not text.rstrip().endswith("|"):
        text = text.rstrip("\n") + "\n\n" + MARKDOWN_HEADER
    elif not text.endswith("\n"):
        text += "\n"
    path.write_text(text + markdown_row(result))


def check_options(options: BenchOptions) -> str | None:
    """What is wrong with the benchmark's own options, in one line; None when nothing is.

    The settings were checked when the config was made (bench_config).
    """
    for name in ("images", "baseline_images", "clients", "job_size"):
        if getattr(options, name) < 1:
            return f"--{name.replace('_', '-')} must be at least 1"
    if options.peak_tflops <= 0:
        return f"--peak-tflops must be positive, got {options.peak_tflops:g}"
    if not 0.01 <= options.poll_seconds <= 60:
        return f"--poll-seconds must be from 0.01 to 60, got {options.poll_seconds}"
    return None
