"""Load a local diffusers text-to-image model and turn prompts into images."""

from __future__ import annotations

import inspect
import json
import logging
import re
from pathlib import Path
from typing import Any

import diffusers
import torch
from diffusers import (
    AutoencoderTiny,
    AutoPipelineForText2Image,
    DiffusionPipeline,
    StableDiffusionPipeline,
)
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0
from packaging.version import Version
from PIL import Image

from appliance.core.devices import cuda_index

logger = logging.getLogger(__name__)

DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
DTYPE_ALIASES = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16"}

FP16_WEIGHTS = re.compile(r"\.fp16(-\d+-of-\d+)?\.(safetensors|bin)$")

# diffusers renamed `torch_dtype` to `dtype` and warns about the old name.
DTYPE_KEYWORD = "dtype" if Version(diffusers.__version__) >= Version("0.42") else "torch_dtype"


class ModelLoadError(RuntimeError):
    pass


def pick_device(requested: str) -> str:
    device = requested.strip().lower()
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return device
    index = cuda_index(device)
    if index is not None:
        _check_cuda(device, index)
        return device
    raise ValueError(f"Unknown device {requested!r}; use auto, cpu, cuda or cuda:N.")


def _check_cuda(device: str, index: int) -> None:
    if not torch.cuda.is_available():
        raise ValueError(
            f"Device {device!r} was requested but this machine has no usable CUDA GPU."
        )
    count = torch.cuda.device_count()
    if index >= count:
        raise ValueError(
            f"Device {device!r} was requested but only {count} CUDA GPU(s) are present."
        )


def pick_dtype(requested: str, device: str) -> torch.dtype:
    name = requested.strip().lower()
    name = DTYPE_ALIASES.get(name, name)
    on_cpu = not device.startswith("cuda")
    if name == "auto":
        return torch.float32 if on_cpu else torch.float16
    if name not in DTYPES:
        raise ValueError(f"Unknown dtype {requested!r}; use auto, {', '.join(DTYPES)}.")
    if name == "float16" and on_cpu:
        # Many CPU kernels lack half precision: it is slow or fails outright.
        logger.warning("float16 is not supported well on the CPU; using float32 instead.")
        return torch.float32
    return DTYPES[name]


def read_model_index(model_dir: Path) -> dict[str, Any]:
    if not model_dir.is_dir():
        raise ModelLoadError(f"Model folder {model_dir} does not exist.")
    index_file = model_dir / "model_index.json"
    if not index_file.is_file():
        raise ModelLoadError(
            f"Model folder {model_dir} is not a diffusers pipeline: it has no model_index.json."
        )
    try:
        return json.loads(index_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ModelLoadError(
            f"Model folder {model_dir} has an unreadable model_index.json: {error}"
        ) from error


def _has_fp16_weights(model_dir: Path) -> bool:
    return any(FP16_WEIGHTS.search(path.name) for path in model_dir.glob("*/*"))


def loading_options(
    model_dir: Path, model_index: dict[str, Any], dtype: torch.dtype
) -> dict[str, Any]:
    options: dict[str, Any] = {DTYPE_KEYWORD: dtype, "local_files_only": True}
    if "safety_checker" in model_index:
        # The appliance never filters images, so the checker would only cost
        # memory and time; dropping it must not trigger the warning about it.
        options["safety_checker"] = None
        if "requires_safety_checker" in model_index:
            options["requires_safety_checker"] = False
    if _has_fp16_weights(model_dir):
        # Folders pulled with half-precision weights only have the variant
        # file names; diffusers falls back per component when one is missing.
        options["variant"] = "fp16"
    return options


def load_pipeline(model_dir: Path, device: str, dtype: torch.dtype) -> DiffusionPipeline:
    model_dir = Path(model_dir)
    options = loading_options(model_dir, read_model_index(model_dir), dtype)
    try:
        pipe = AutoPipelineForText2Image.from_pretrained(model_dir, **options)
        pipe = pipe.to(device)
    except Exception as error:
        # diffusers raises a wide range of exception types for broken folders.
        raise ModelLoadError(f"Could not load the model in {model_dir}: {error}") from error
    pipe.set_progress_bar_config(disable=True)
    logger.info("Loaded %s from %s on %s as %s", type(pipe).__name__, model_dir, device, dtype)
    return pipe


def _check_request(
    pipe: DiffusionPipeline, prompts: list[str], seeds: list[int], width: int, height: int
) -> None:
    if not prompts:
        raise ValueError("At least one prompt is needed.")
    if len(prompts) != len(seeds):
        raise ValueError(
            f"Got {len(prompts)} prompts but {len(seeds)} seeds; each image needs its own seed."
        )
    multiple = getattr(pipe, "vae_scale_factor", 8)
    if width % multiple or height % multiple:
        raise ValueError(f"Width and height must be multiples of {multiple}; got {width}x{height}.")


def generate(pipe: DiffusionPipeline, prompts: list[str], seeds: list[int],
             **options: Any) -> list[Image.Image]:
    """render()'s images as PIL images on the CPU; `options` are render()'s."""
    pixels = render(pipe, prompts, seeds, **options)
    return [Image.fromarray(array) for array in pixels.cpu().numpy()]


def render(
    pipe: DiffusionPipeline,
    prompts: list[str],
    seeds: list[int],
    *,
    width: int,
    height: int,
    steps: int,
    guidance: float,
    negative_prompt: str | None = None,
    vae_chunk: int = 0,
) -> torch.Tensor:
    """The images as uint8 pixels (batch, height, width, RGB), left on the pipeline's device.

    Copying them off the device is the caller's business, so that it need not
    wait for the copy before starting the next batch.
    """
    _check_request(pipe, prompts, seeds, width, height)
    # One generator per image: each image's starting noise depends on its seed
    # alone, so it does not change with the rest of the batch.
    generators = [torch.Generator(device=pipe.device).manual_seed(seed) for seed in seeds]
    negative_prompts = None if negative_prompt is None else [negative_prompt] * len(prompts)
    # Stable Diffusion's latents are decoded here, in chunks; other pipelines
    # decode their own way (see use_vae_slicing).
    decode_here = isinstance(pipe, StableDiffusionPipeline)
    options = {"prompt": list(prompts), "width": width, "height": height,
               "num_inference_steps": steps, "guidance_scale": guidance,
               "generator": generators, "output_type": "latent" if decode_here else "pt"}
    if negative_prompts is not None:
        if "negative_prompt" not in _call_parameters(pipe):
            raise ValueError(f"this model's pipeline ({type(pipe).__name__}) takes no negative"
                             " prompt; ask without one")
        options["negative_prompt"] = negative_prompts
    with torch.inference_mode():
        result = pipe(**options)
        if decode_here:
            return decode_latents(pipe.vae, result.images, vae_chunk)
        return _to_pixels(result.images)


def _call_parameters(pipe: DiffusionPipeline) -> frozenset[str]:
    """The keywords the pipeline's __call__ takes (FLUX, for one, takes no negative prompt)."""
    return frozenset(inspect.signature(pipe.__call__).parameters)


def decode_latents(vae: Any, latents: torch.Tensor, chunk: int = 0) -> torch.Tensor:
    """Latents -> uint8 pixels, `chunk` images at a time (0: all at once); `vae` is a diffusers
    AutoencoderKL or AutoencoderTiny."""
    latents = latents.to(vae.dtype) / vae.config.scaling_factor
    parts = latents.split(chunk) if chunk else (latents,)
    with torch.inference_mode():
        return torch.cat([_to_pixels(vae.decode(part, return_dict=False)[0] / 2 + 0.5)
                          for part in parts])


def _to_pixels(images: torch.Tensor) -> torch.Tensor:
    # Rounded as diffusers rounds for PIL output, so both give the same pixels;
    # done on the device, so a quarter of float32's bytes travels to the CPU.
    pixels = (images.float().clamp(0, 1) * 255).round().to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).contiguous()


# Speed


def optimize_pipeline(pipe: DiffusionPipeline, device: str, channels_last: bool) -> None:
    """Speed-ups that leave the images as they are, up to rounding: kernels, memory layout."""
    for model in _conv_models(pipe):
        _use_sdpa(model)
    on_cuda = device.startswith("cuda")
    if channels_last:
        # cuDNN's and oneDNN's fastest convolutions read NHWC; the weights are
        # converted once here and the activations follow them. On the CPU only
        # the denoiser gains (a UNet step of the tiny model took a fifth less
        # time); the VAE decoder, working at full image size, was slower there.
        for model in _conv_models(pipe, with_vae=on_cuda):
            model.to(memory_format=torch.channels_last)
    if on_cuda:
        # Each batch shape is tuned once, then reused; float32 matrix work may use TF32.
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def _conv_models(pipe: DiffusionPipeline, with_vae: bool = True) -> list[Any]:
    # diffusers models: torch modules whose own methods (set_attn_processor) and
    # keywords (memory_format) torch's type hints do not know.
    models = (getattr(pipe, "unet", None), getattr(pipe, "vae", None) if with_vae else None)
    return [model for model in models if isinstance(model, torch.nn.Module)]


def _use_sdpa(model: Any) -> None:
    # PyTorch's fused scaled-dot-product attention (flash or memory-efficient
    # kernels); models with special attention processors keep theirs.
    processors = getattr(model, "attn_processors", None)
    plain = (AttnProcessor, AttnProcessor2_0)
    if processors and all(type(p) in plain for p in processors.values()):
        model.set_attn_processor(AttnProcessor2_0())


def use_vae_slicing(pipe: DiffusionPipeline) -> None:
    """Where the pipeline decodes by itself, it decodes one image at a time, to save memory."""
    if not isinstance(pipe, StableDiffusionPipeline) and hasattr(pipe.vae, "enable_slicing"):
        pipe.vae.enable_slicing()


def use_tiny_vae(pipe: DiffusionPipeline, folder: Path, dtype: torch.dtype) -> None:
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise ModelLoadError(f"Tiny VAE folder {folder} has no config.json.")
    try:
        vae = AutoencoderTiny.from_pretrained(folder, **{DTYPE_KEYWORD: dtype,
                                                         "local_files_only": True})
    except Exception as error:
        raise ModelLoadError(f"Could not load the tiny VAE in {folder}: {error}") from error
    pipe.vae = vae.to(pipe.device)
    logger.info("Decoding with the tiny VAE from %s", folder)


def compile_pipeline(pipe: DiffusionPipeline, mode: str) -> None:
    """Compiles the denoiser and the VAE decoder in place; the first call of each shape compiles."""
    # One compiled graph per batch size and image size; the default limit of 8 is soon reached.
    torch._dynamo.config.recompile_limit = max(64, torch._dynamo.config.recompile_limit)
    # Fixed shapes: the batch sizes in use are padded to a few and warmed up.
    options = {"mode": mode, "dynamic": False}
    denoiser = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
    if denoiser is not None:
        denoiser.compile(**options)
    decoder = getattr(getattr(pipe, "vae", None), "decoder", None)
    if decoder is not None:
        decoder.compile(**options)
    logger.info("Compiling the pipeline with torch.compile (mode %s)", mode)
