"""The benchmark's baseline: the plain diffusers loop a user would write.

One prompt per pipeline call, diffusers' own defaults (its default attention,
no compile, no batching), half precision on CUDA, and each image saved as a
PNG before the next call. It runs in a process of its own, so that its GPU
memory is its own and is gone before the appliance starts.

    python -m appliance.bench.baseline --model DIR --prompts-file P.json --out DIR
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
from diffusers import AutoPipelineForText2Image

from appliance.engine.pipeline import loading_options, pick_device, pick_dtype, read_model_index


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    model = next((line.split(":", 1)[1].strip()
                  for line in _read_lines("/proc/cpuinfo") if line.startswith("model name")),
                 "CPU")
    return f"{model} ({os.cpu_count()} cores)"


def _read_lines(path: str) -> list[str]:
    try:
        return Path(path).read_text().splitlines()
    except OSError:
        return []


def run(model: Path, device: str, dtype: str, prompts: list[str], width: int, height: int,
        steps: int, guidance: float, out: Path, compress_level: int) -> dict:
    device = pick_device(device)
    torch_dtype = pick_dtype(dtype, device)
    # The same loading options as the appliance: its dtype, no safety checker
    # (the appliance runs none either), local files only.
    options = loading_options(model, read_model_index(model), torch_dtype)
    pipe = AutoPipelineForText2Image.from_pretrained(model, **options).to(device)
    pipe.set_progress_bar_config(disable=True)

    def make(prompt: str):
        return pipe(prompt, width=width, height=height, num_inference_steps=steps,
                    guidance_scale=guidance).images[0]

    # One untimed call, as the appliance is warmed up before its clock starts.
    make(prompts[0])
    out.mkdir(parents=True, exist_ok=True)
    on_cuda = device.startswith("cuda")
    if on_cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    started, cpu_started = time.perf_counter(), time.process_time()
    for index, prompt in enumerate(prompts):
        make(prompt).save(out / f"{index}.png", compress_level=compress_level)
    seconds = time.perf_counter() - started
    cpu_seconds = time.process_time() - cpu_started
    return {
        "images": len(prompts),
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "images_per_second": len(prompts) / seconds,
        "peak_gpu_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if on_cuda else None,
        "device": device,
        "device_name": device_name(device),
        "dtype": str(torch_dtype).removeprefix("torch."),
        "pipeline": type(pipe).__name__,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m appliance.bench.baseline",
                                     description="time the plain diffusers loop")
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--height", type=int, default=512)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--compress-level", type=int, default=6)
    parser.add_argument("--prompts-file", type=Path, required=True, help="a JSON list of prompts")
    parser.add_argument("--out", type=Path, required=True, help="folder for the PNGs")
    args = parser.parse_args(argv)
    prompts = json.loads(args.prompts_file.read_text())
    result = run(args.model, args.device, args.dtype, prompts, args.width, args.height,
                 args.steps, args.guidance, args.out, args.compress_level)
    # The last line of the output is the result, for the benchmark to read.
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
