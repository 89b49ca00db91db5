"""`appliance bench`: a short CPU pass so the benchmark itself never rots, and its arithmetic."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from appliance.bench import (
    BenchOptions,
    append_markdown,
    architecture,
    bench_config,
    markdown_row,
    server_sections,
    serving,
    tflop_per_image,
)
from appliance.cli.main import main
from appliance.core.config import config_from_dict

from .cli_helpers import run_benchmark

# main() points the root logger at each test's captured stderr, which closes after it.
pytestmark = pytest.mark.usefixtures("root_handlers_restored")


@pytest.mark.system
def test_short_cpu_pass_prints_and_records_the_figures(tiny_model, tmp_path, capsys):
    config = tmp_path / "config.toml"
    config.write_text(f'[model]\npath = "{tiny_model}"\ndevice = "cpu"\n')
    results, table = tmp_path / "results.json", tmp_path / "BENCHMARKS.md"
    printed, result = run_benchmark(
        capsys, results, "bench", "--config", str(config), "--width", "64", "--height", "64",
        "--steps", "2", "--batch-size", "4", "--images", "8", "--baseline-images", "2",
        "--clients", "2", "--job-size", "2", "--poll-seconds", "0.2", "--markdown", str(table))

    appliance, baseline = result["appliance"], result["baseline"]
    made = (appliance["completed_images"], appliance["failed_images"], appliance["jobs"])
    assert made == (8, 0, 4)
    assert baseline["images"] == 2 and baseline["device"] == "cpu" and result["poll_seconds"] == 0.2
    assert appliance["images_per_second"] > 0 and baseline["images_per_second"] > 0
    assert result["ratio"] == appliance["images_per_second"] / baseline["images_per_second"]
    assert 0 < appliance["job_latency_p50_s"] <= appliance["job_latency_p95_s"]
    assert appliance["job_latency_p95_s"] <= appliance["seconds"]
    assert (result["architecture"], result["compute"], appliance["peak_gpu_memory_gib"]) == (
        "tiny", None, None)
    assert f"{appliance['images_per_second']:.3f} images/s" in printed
    assert "ratio: " in printed and "peak GPU memory: plain loop n/a on CPU" in printed
    assert appliance["cpu_seconds"] > 0 and baseline["cpu_seconds"] > 0
    assert "CPU time per image: plain loop" in printed
    rows = [line for line in table.read_text().splitlines() if line.startswith("| 2")]
    assert len(rows) == 1 and "| tiny (float32) | 64x64 | 2 | 7.5 | 4 | off |" in rows[0]


def sd15_folder(tmp_path: Path) -> Path:
    (tmp_path / "unet").mkdir(parents=True)
    (tmp_path / "unet" / "config.json").write_text(json.dumps(
        {"block_out_channels": [320, 640, 1280, 1280], "cross_attention_dim": 768}))
    return tmp_path


def settings(model: Path, **generation) -> object:
    return config_from_dict({"model": {"path": str(model)},
                             "generation": {"width": 512, "height": 512, "steps": 25,
                                            "guidance_scale": 7.5, **generation}},
                            base_dir=model)


def test_compute_is_counted_for_sd15_at_512_only(tmp_path, tiny_model):
    model = sd15_folder(tmp_path)
    assert architecture(model) == "sd15" and architecture(tiny_model) == "tiny"
    # 25 steps with guidance: 50 UNet forwards of 0.8 TFLOP, and one 2.5 TFLOP decode.
    assert tflop_per_image(settings(model)) == pytest.approx(42.5)
    assert tflop_per_image(settings(model, steps=1, guidance_scale=0.0)) == pytest.approx(3.3)
    assert tflop_per_image(settings(model, width=768)) is None
    assert tflop_per_image(settings(tiny_model)) is None


def test_rows_go_under_one_table_header(tmp_path):
    result = {
        "date": "2026-01-02T03:04:05Z", "device": "NVIDIA H100 80GB HBM3", "devices": ["cuda:0"],
        "architecture": "sd15", "dtype": "float16", "width": 512, "height": 512, "steps": 25,
        "guidance_scale": 7.5, "batch_size": 16, "compile": "off",
        "baseline": {"images": 16, "images_per_second": 1.5, "peak_gpu_memory_gib": 3.2},
        "appliance": {"completed_images": 256, "images_per_second": 9.25,
                      "job_latency_p50_s": 12.0, "job_latency_p95_s": 25.5,
                      "peak_gpu_memory_gib": 14.04},
        "ratio": 9.25 / 1.5,
        "compute": {"baseline_fraction": 0.0807, "appliance_fraction": 0.4976},
    }
    table = tmp_path / "BENCHMARKS.md"
    table.write_text("# Benchmarks\n\nSome words.\n")
    append_markdown(table, result)
    append_markdown(table, result)
    text = table.read_text()
    assert text.startswith("# Benchmarks\n\nSome words.\n\n| date | device |")
    assert text.count("| date |") == 1 and text.count(markdown_row(result)) == 2
    assert markdown_row(result) == (
        "| 2026-01-02 | NVIDIA H100 80GB HBM3 | sd15 (float16) | 512x512 | 25 | 7.5 | 16 | off"
        " | 256 (loop 16) | 1.500 | 9.250 | 6.17x | 12.00 | 25.50 | 3.2 / 14.0 | 8.1% / 49.8% |\n")


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--images", "0"], "--images must be at least 1"),
        (["--width", "500"], "generation.width must be a multiple of 8 between 64 and 2048,"
                             " got 500"),
        (["--set", "engine.batch_size=0"], "engine.batch_size must be between 1 and 256, got 0"),
        (["--set", "engine.batch_sise=8"], "unknown key engine.batch_sise"),
        (["--steps", "many"], "generation.steps must be an integer, got 'many'"),
        (["--model", "{tmp}/nowhere"], "nowhere is not a diffusers model folder"),
        (["--poll-seconds", "0"], "--poll-seconds must be from 0.01 to 60, got 0.0"),
    ],
)
def test_bad_arguments_are_refused_in_one_line(tmp_path, capsys, arguments, message):
    config = tmp_path / "config.toml"
    config.write_text("")
    arguments = [argument.format(tmp=tmp_path) for argument in arguments]
    assert main(["bench", "--config", str(config), *arguments]) == 1
    error = capsys.readouterr().err.strip()
    assert message in error and "\n" not in error
    assert not (tmp_path / "nowhere").exists() and not (tmp_path / "models").exists()


def test_peak_gpu_memory_is_read_from_the_servers_shutdown_log():
    log = ('ts=2026-01-02T03:04:05.000Z level=info logger=appliance.engine msg="peak GPU memory'
           ' on cuda:0: 10.50 GiB allocated, 12.00 GiB reserved"\n'
           'ts=2026-01-02T03:04:05.001Z level=info logger=appliance.engine msg="peak GPU memory'
           ' on cuda:1: 11.25 GiB allocated, 12.00 GiB reserved"\n')
    assert serving.peak_gpu_memory_gib(log) == 11.25
    assert serving.peak_gpu_memory_gib("level=info msg=\"Application shutdown complete.\"") is None


def test_the_server_gets_the_benchmarks_settings_with_paths_absolute(tmp_path):
    # The server's config file lives in a folder of its own.
    config_file = tmp_path / "config.toml"
    config_file.write_text('[model]\npath = "models/mine"\n[engine]\nbatch_size = 4\n')
    config = bench_config(config_file, ["engine.batch_size=16", "generation.steps=150"])
    chosen = BenchOptions(config, images=1, baseline_images=1, clients=1, job_size=1,
                          peak_tflops=1.0)
    sections = server_sections(chosen, tmp_path / "work", 8000)
    assert sections["model"]["path"] == str(tmp_path / "models" / "mine")
    # Every engine setting travels, the last assignment winning over the file.
    assert sections["engine"]["batch_size"] == 16
    assert set(sections["engine"]) >= {"compile", "channels_last", "vae_decode_chunk"}
    # A default outside the file's request bounds still makes a server that starts.
    assert sections["generation"]["steps"] == 150
    assert config_from_dict(sections, base_dir=tmp_path).generation.max_steps >= 150


@pytest.mark.system
def test_the_models_benchmark_times_loads_and_each_run_against_one_model(tmp_path, capsys):
    results = tmp_path / "models.json"
    printed, result = run_benchmark(
        capsys, results, "bench-models", "--device", "cpu", "--width", "64", "--steps", "1",
        "--batch-size", "2", "--images", "4", "--job-size", "2", "--loads", "1", "--rounds", "1",
        "--swap-seconds", "0")
    runs = result["runs"]
    assert list(runs) == ["one model", "two models, both loaded", "two models, one at a time"]
    assert all(run["images"] == 4 and run["images_per_second"] > 0 for run in runs.values())
    # One model: loaded once; two that fit: each once; one at a time: the second load
    # unloads the first (and, with no wait allowed, more swaps may follow).
    assert (runs["one model"]["loads"], runs["one model"]["unloads"]) == (1, 0)
    assert (runs["two models, both loaded"]["loads"],
            runs["two models, both loaded"]["unloads"]) == (2, 0)
    one_at_a_time = runs["two models, one at a time"]
    assert one_at_a_time["loads"] >= 2 and one_at_a_time["unloads"] == one_at_a_time["loads"] - 1
    assert all(len(seconds) == 1 and seconds[0] > 0
               for seconds in result["load_seconds"].values())
    assert "x one model" in printed and "load (swap cost) of model-a" in printed
