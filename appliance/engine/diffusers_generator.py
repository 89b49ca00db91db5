"""The engine's generator backed by a diffusers pipeline from a local folder."""

from __future__ import annotations

import logging
from pathlib import Path

import diffusers
import transformers
from PIL import Image

from ..config import Config
from ..jobs import GenerationSettings
from .pipeline import generate, load_pipeline, pick_device, pick_dtype
from .synth import synthesize

log = logging.getLogger(__name__)


class DiffusersGenerator:
    def __init__(self, pipe):
        self.pipe = pipe

    def generate(self, prompts: list[str], seeds: list[int],
                 settings: GenerationSettings) -> list[Image.Image]:
        return generate(self.pipe, prompts, seeds, width=settings.width, height=settings.height,
                        steps=settings.steps, guidance=settings.guidance_scale)


def ensure_model(model_dir: Path) -> Path:
    """Makes the tiny demo model where no model is installed, so a new install works offline."""
    if not model_dir.exists():
        log.warning(
            "no model at %s: creating the built-in tiny demo model there. Its weights are random,"
            " so every image will be noise. Install a real model with"
            " `appliance models pull REPO_ID %s` (after removing the demo folder) and restart.",
            model_dir, model_dir,
        )
        synthesize(model_dir, "tiny")
    return model_dir


def load_configured_generator(config: Config) -> DiffusersGenerator:
    # Progress bars are for terminals; in the service log they are noise.
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    device = pick_device(config.model.device)
    dtype = pick_dtype(config.model.dtype, device)
    model_dir = ensure_model(config.model.path)
    log.info("loading the model from %s on %s (%s)", model_dir, device, dtype)
    return DiffusersGenerator(load_pipeline(model_dir, device, dtype))
