"""The engine's generator backed by a diffusers pipeline from a local folder."""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import diffusers
import torch
import transformers
from PIL import Image

from appliance.core.config import Config
from appliance.engine.pending import PendingImages
from appliance.engine.pipeline import (
    compile_pipeline,
    load_pipeline,
    optimize_pipeline,
    pick_device,
    pick_dtype,
    render,
    use_tiny_vae,
    use_vae_slicing,
)
from appliance.engine.synth import synthesize
from appliance.jobs.catalog import InstalledModel
from appliance.jobs.models import GenerationSettings

log = logging.getLogger(__name__)

# Compiled graphs are shape-specific; warm-up runs this few steps, since the
# step count changes no shape.
WARM_UP_STEPS = 2


class LoraApplier(Protocol):
    def apply(self, loras: tuple[tuple[str, float], ...]) -> None: ...


class DiffusersGenerator:
    def __init__(self, pipe, vae_chunk: int = 0, batch_sizes: tuple[int, ...] = (),
                 adapters: LoraApplier | None = None):
        self.pipe = pipe
        self.vae_chunk = vae_chunk
        # With a compiled pipeline, each batch is padded to the next of these
        # sizes, so it runs on a graph compiled at warm-up; () runs it as it is.
        self.batch_sizes = tuple(sorted(batch_sizes))
        # The LoRA adapters loaded into the pipeline (None: none may be).
        self.adapters = adapters

    def memory_bytes(self) -> int:
        """Bytes the pipeline's weights take on its device."""
        return sum(tensor.numel() * tensor.element_size()
                   for component in self.pipe.components.values()
                   if isinstance(component, torch.nn.Module)
                   for tensor in itertools.chain(component.parameters(), component.buffers()))

    def generate(self, prompts: list[str], seeds: list[int],
                 settings: GenerationSettings) -> list[Image.Image]:
        pending = self.launch(prompts, seeds, settings)
        return [pending.image(index) for index in range(len(pending))]

    def launch(self, prompts: list[str], seeds: list[int],
               settings: GenerationSettings) -> PendingImages:
        """Starts the batch on the device; returns before its images are on the CPU."""
        started = time.perf_counter()
        count = len(prompts)
        padded = next((size for size in self.batch_sizes if size >= count), count)
        # Filler images repeat the last prompt and seed, and are dropped.
        prompts = list(prompts) + [prompts[-1]] * (padded - count)
        seeds = list(seeds) + [seeds[-1]] * (padded - count)
        if self.adapters is not None:
            self.adapters.apply(settings.loras)
        elif settings.loras:
            raise RuntimeError("this pipeline cannot apply LoRA adapters")
        pixels = render(self.pipe, prompts, seeds, width=settings.width, height=settings.height,
                        steps=settings.steps, guidance=settings.guidance_scale,
                        negative_prompt=settings.negative_prompt, vae_chunk=self.vae_chunk)
        return PendingImages(pixels[:count], started)

    def warm_up(self, settings: GenerationSettings, batch_sizes: tuple[int, ...]) -> None:
        for size in batch_sizes:
            started = time.perf_counter()
            self.launch(["warm-up"] * size, list(range(size)), settings).image(0)
            log.info("warmed up batches of %d at %dx%d in %.1f s", size, settings.width,
                     settings.height, time.perf_counter() - started)


def compiled_batch_sizes(batch_size: int) -> tuple[int, ...]:
    """Powers of two below batch_size, and batch_size: padding wastes at most half a batch."""
    sizes = {batch_size}
    size = 1
    while size < batch_size:
        sizes.add(size)
        size *= 2
    return tuple(sorted(sizes))


def vae_chunk(configured: int, device: str) -> int:
    """Images the VAE decodes at once on `device`."""
    if device.startswith("cuda"):
        return configured
    # On the CPU one image at a time is fastest: its full-size activations stay
    # in the caches (the tiny model decoded a batch of 8 in 0.07 s an image
    # this way against 0.12 s all together), and memory is no concern there.
    return 1


_model_lock = threading.Lock()
_compile_lock = threading.Lock()


def ensure_model(model_dir: Path) -> Path:
    """Makes the tiny demo model where no model is installed, so a new install works offline."""
    # Workers of several GPUs load at once; one of them makes the model.
    with _model_lock:
        if not model_dir.exists():
            log.warning(
                "no model at %s: creating the built-in tiny demo model there. Its weights are"
                " random, so every image will be noise. Install a real model with"
                " `appliance models pull REPO_ID NAME` and set model.default = \"NAME\".",
                model_dir,
            )
            synthesize(model_dir, "tiny")
    return model_dir


def load_configured_generator(config: Config, device: str | None = None,
                              model: InstalledModel | None = None,
                              lora_path: Callable[[str], Path] | None = None
                              ) -> DiffusersGenerator:
    """Loads, speeds up and warms up `model` (default: the one in model.path) on `device`
    (default: model.device); `lora_path(name)` finds the adapters requests apply.

    Runs on the worker thread of that device, which keeps it as its current one.
    """
    # Progress bars are for terminals; in the service log they are noise.
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    device = pick_device(device or config.model.device)
    if device.startswith("cuda:"):
        torch.cuda.set_device(device)
    dtype = pick_dtype(model.dtype if model else config.model.dtype, device)
    path = model.path if model else config.model.path
    model_dir = ensure_model(path) if path == config.model.path else path
    engine = config.engine
    log.info("loading the model from %s on %s (%s)", model_dir, device, dtype)
    pipe = load_pipeline(model_dir, device, dtype)
    tiny_vae = model.tiny_vae if model else engine.tiny_vae
    if tiny_vae:
        use_tiny_vae(pipe, config.resolve(tiny_vae), dtype)
    optimize_pipeline(pipe, device, engine.channels_last)
    if engine.vae_decode_chunk:
        use_vae_slicing(pipe)
    batch_sizes: tuple[int, ...] = ()
    if engine.compile != "off":
        compile_pipeline(pipe, engine.compile)
        batch_sizes = compiled_batch_sizes(engine.batch_size)
    adapters = None
    if lora_path is not None:
        from appliance.engine.adapters import Adapters

        adapters = Adapters(pipe, lora_path)
    generator = DiffusersGenerator(pipe, vae_chunk(engine.vae_decode_chunk, device), batch_sizes,
                                   adapters)
    generation = config.generation
    defaults = model.defaults if model else generation
    settings = GenerationSettings(defaults.width, defaults.height, WARM_UP_STEPS,
                                  defaults.guidance_scale)
    if batch_sizes:
        # torch.compile is not made for compiling on several threads at once.
        with _compile_lock:
            generator.warm_up(settings, batch_sizes)
    elif device.startswith("cuda"):
        # cuDNN picks its kernels on first use of a shape: let that be now.
        generator.warm_up(settings, (engine.batch_size,))
    return generator
