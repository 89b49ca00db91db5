"""Build Stable Diffusion pipelines with random weights.

A synthesized model has the real folder layout and architecture of a
diffusers text-to-image pipeline, so the whole appliance can be exercised
offline without downloading gigabytes of weights. Its images are noise.

torch, diffusers, transformers and peft are imported inside the functions that
build weights: the command line reads ALLOWED_SIZES when it starts, and must
not wait seconds for those imports.
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from appliance.core.files import is_free, staged_folder
from appliance.jobs.catalog import LORA_DECLARATION

if TYPE_CHECKING:
    import torch
    from diffusers import DiffusionPipeline
    from transformers import CLIPTokenizer

logger = logging.getLogger(__name__)

ModelT = TypeVar("ModelT", bound="torch.nn.Module")

ALLOWED_SIZES = ("tiny", "sd15", "tiny-sdxl")

START_TOKEN = "<|startoftext|>"
END_TOKEN = "<|endoftext|>"
WORD_END = "</w>"
TEXT_MAX_LENGTH = 77
SD15_VOCAB_SIZE = 49408

# Words the tokenizer learns merges from, so typical prompts become a handful
# of tokens instead of one token per letter.
MERGE_SOURCE_WORDS = """
a an the of and in on with at by for from to is it this that as or
photo photograph picture image painting drawing sketch illustration render
portrait landscape closeup close up view scene style art artwork digital oil
watercolor pencil ink anime cartoon realistic photorealistic detailed highly
sharp focus light lighting sunlight sunset sunrise night day morning evening
sky cloud clouds sun moon star stars rain snow fog mist storm
mountain mountains river lake sea ocean beach forest tree trees flower flowers
garden field grass desert island city street road house castle tower bridge
cat dog bird horse fish lion tiger wolf fox bear dragon robot
man woman girl boy child people person face eyes hair smile
red orange yellow green blue purple pink white black gray grey brown gold silver
dark bright colorful soft warm cold beautiful cute old new small big large tiny
wooden stone glass metal water fire ice
high quality best masterpiece resolution cinematic dramatic epic fantasy
background foreground standing sitting running flying walking
""".split()

MAX_MERGES = 1000


def _byte_symbols() -> list[str]:
    """The 256 printable stand-ins byte-level BPE uses for raw bytes.

    Printable Latin-1 bytes stand for themselves and come first, as in CLIP's
    vocabulary; the other bytes follow, shifted above U+0100 so that every
    byte maps to a visible, non-whitespace character.
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("\N{INVERTED EXCLAMATION MARK}"), ord("\N{NOT SIGN}") + 1),
        *range(ord("\N{REGISTERED SIGN}"), ord("\N{LATIN SMALL LETTER Y WITH DIAERESIS}") + 1),
    ]
    others = [byte for byte in range(256) if byte not in printable]
    return [chr(byte) for byte in printable] + [chr(256 + index) for index in range(len(others))]


def _split_word(word: str) -> tuple[str, ...]:
    return (*word[:-1], word[-1] + WORD_END)


def _most_frequent_pair(words: Counter[tuple[str, ...]]) -> tuple[str, str] | None:
    pairs: Counter[tuple[str, str]] = Counter()
    for pieces, count in words.items():
        for pair in itertools.pairwise(pieces):
            pairs[pair] += count
    if not pairs:
        return None
    # Ties are broken alphabetically so the merge list never depends on dict order.
    return min(pairs, key=lambda pair: (-pairs[pair], pair))


def _apply_merge(pieces: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    merged: list[str] = []
    index = 0
    while index < len(pieces):
        if pieces[index : index + 2] == pair:
            merged.append(pieces[index] + pieces[index + 1])
            index += 2
        else:
            merged.append(pieces[index])
            index += 1
    return tuple(merged)


def learn_merges(words: list[str], max_merges: int = MAX_MERGES) -> list[tuple[str, str]]:
    word_pieces = Counter(_split_word(word) for word in words)
    merges: list[tuple[str, str]] = []
    while len(merges) < max_merges:
        pair = _most_frequent_pair(word_pieces)
        if pair is None:
            break
        merges.append(pair)
        word_pieces = Counter(
            {_apply_merge(pieces, pair): count for pieces, count in word_pieces.items()}
        )
    return merges


def build_vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
    # Same ordering as the original CLIP vocabulary: bytes, bytes ending a word,
    # merged pieces, then the two special tokens last.
    symbols = _byte_symbols()
    tokens = [*symbols, *(symbol + WORD_END for symbol in symbols)]
    tokens += [left + right for left, right in merges]
    tokens += [START_TOKEN, END_TOKEN]
    return {token: index for index, token in enumerate(tokens)}


@functools.cache
def _generated_merges() -> tuple[tuple[str, str], ...]:
    return tuple(learn_merges(MERGE_SOURCE_WORDS))


def write_tokenizer(folder: Path) -> CLIPTokenizer:
    from transformers import CLIPTokenizer

    merges = list(_generated_merges())
    vocab = build_vocab(merges)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(
        json.dumps(vocab, ensure_ascii=False, indent=1), encoding="utf-8"
    )
    merge_lines = ["#version: 0.2", *(f"{left} {right}" for left, right in merges)]
    (folder / "merges.txt").write_text("\n".join(merge_lines) + "\n", encoding="utf-8")
    # Loading the folder works across transformers releases, whereas the
    # constructor's vocab_file/merges_file arguments are silently ignored by
    # transformers 5 (leaving a three-token vocabulary).
    tokenizer = CLIPTokenizer.from_pretrained(
        folder,
        model_max_length=TEXT_MAX_LENGTH,
        pad_token=END_TOKEN,
    )
    tokenizer.save_pretrained(folder)
    return tokenizer


def _sd15_betas() -> dict[str, Any]:
    return {
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
    }


def _special_token_ids() -> dict[str, int]:
    vocab = build_vocab(list(_generated_merges()))
    # The pooled text embedding is read at the end token, so the text model
    # must know its id; padding reuses the end token as in CLIP.
    return {
        "bos_token_id": vocab[START_TOKEN],
        "eos_token_id": vocab[END_TOKEN],
        "pad_token_id": vocab[END_TOKEN],
    }


def _tiny_configs() -> dict[str, dict[str, Any]]:
    return {
        "unet": {
            # 8 latent pixels * vae scale factor 8 = 64 pixel default images.
            "sample_size": 8,
            "in_channels": 4,
            "out_channels": 4,
            # Attention only at the coarsest level: self-attention over the
            # 4096 positions of a 512 pixel image's latents costs more on a CPU
            # than the rest of the network together.
            "down_block_types": ("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
            "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
            "block_out_channels": (16, 32, 32),
            "layers_per_block": 1,
            "cross_attention_dim": 32,
            # For this model class the value is the number of heads (16 channels each).
            "attention_head_dim": 2,
            "norm_num_groups": 8,
        },
        "vae": {
            "in_channels": 3,
            "out_channels": 3,
            # Four levels give the SD downsampling factor of 8.
            "down_block_types": ("DownEncoderBlock2D",) * 4,
            "up_block_types": ("UpDecoderBlock2D",) * 4,
            # Few channels at the top: the decoder's last level runs on every
            # output pixel and dominates decoding time.
            "block_out_channels": (4, 8, 8, 16),
            "layers_per_block": 1,
            "latent_channels": 4,
            "norm_num_groups": 4,
            "sample_size": 64,
            "scaling_factor": 0.18215,
        },
        "text_encoder": {
            "vocab_size": len(build_vocab(list(_generated_merges()))),
            "hidden_size": 32,
            "intermediate_size": 37,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "max_position_embeddings": TEXT_MAX_LENGTH,
            "projection_dim": 32,
            "hidden_act": "quick_gelu",
            **_special_token_ids(),
        },
    }


# SDXL conditions its UNet on six numbers besides the text: the original
# size, the crop's top-left corner and the target size, each (height, width).
SDXL_TIME_IDS = 6


def _tiny_sdxl_configs() -> dict[str, dict[str, Any]]:
    tiny = _tiny_configs()
    # Both encoders are the tiny one; the second also projects its pooled
    # output, which SDXL feeds to the UNet along with the time ids.
    first, second = tiny["text_encoder"], tiny["text_encoder"]
    time_embed_dim = 8
    return {
        "unet": {
            **tiny["unet"],
            # SDXL's text conditioning: both encoders' hidden states side by side.
            "cross_attention_dim": first["hidden_size"] + second["hidden_size"],
            "use_linear_projection": True,
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": time_embed_dim,
            "projection_class_embeddings_input_dim": (
                SDXL_TIME_IDS * time_embed_dim + second["projection_dim"]
            ),
        },
        # SDXL's VAE has SD 1.5's architecture and another latent scale.
        "vae": {**tiny["vae"], "scaling_factor": 0.13025},
        "text_encoder": first,
        "text_encoder_2": second,
    }


def _sd15_configs() -> dict[str, dict[str, Any]]:
    return {
        "unet": {
            "sample_size": 64,
            "in_channels": 4,
            "out_channels": 4,
            "down_block_types": (
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
                "DownBlock2D",
            ),
            "up_block_types": (
                "UpBlock2D",
                "CrossAttnUpBlock2D",
                "CrossAttnUpBlock2D",
                "CrossAttnUpBlock2D",
            ),
            "block_out_channels": (320, 640, 1280, 1280),
            "layers_per_block": 2,
            "cross_attention_dim": 768,
            "attention_head_dim": 8,
            "norm_num_groups": 32,
        },
        "vae": {
            "in_channels": 3,
            "out_channels": 3,
            "down_block_types": ("DownEncoderBlock2D",) * 4,
            "up_block_types": ("UpDecoderBlock2D",) * 4,
            "block_out_channels": (128, 256, 512, 512),
            "layers_per_block": 2,
            "latent_channels": 4,
            "norm_num_groups": 32,
            "sample_size": 512,
            "scaling_factor": 0.18215,
        },
        "text_encoder": {
            "vocab_size": SD15_VOCAB_SIZE,
            "hidden_size": 768,
            "intermediate_size": 3072,
            "num_hidden_layers": 12,
            "num_attention_heads": 12,
            "max_position_embeddings": TEXT_MAX_LENGTH,
            "projection_dim": 768,
            "hidden_act": "quick_gelu",
            **_special_token_ids(),
        },
    }


def _check_size(size: str) -> None:
    if size not in ALLOWED_SIZES:
        raise ValueError(
            f"Unknown model size {size!r}; allowed sizes are: {', '.join(ALLOWED_SIZES)}."
        )


def architecture_configs(size: str) -> dict[str, dict[str, Any]]:
    """Config dicts for the unet, vae and text_encoder (SDXL: also text_encoder_2)
    of a synthesized model."""
    _check_size(size)
    builders = {"tiny": _tiny_configs, "sd15": _sd15_configs, "tiny-sdxl": _tiny_sdxl_configs}
    return builders[size]()


def _seeded(seed: int, half: bool, build: Callable[[], ModelT]) -> ModelT:
    # Re-seeding before every model keeps each one's weights independent of
    # how many random numbers the models built before it consumed.
    import torch

    torch.manual_seed(seed)
    model = build()
    return model.half() if half else model


def _build_pipeline(
    configs: dict[str, dict[str, Any]], tokenizer: CLIPTokenizer, seed: int, half: bool
) -> DiffusionPipeline:
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    unet = _seeded(seed, half, lambda: UNet2DConditionModel(**configs["unet"]))
    vae = _seeded(seed, half, lambda: AutoencoderKL(**configs["vae"]))
    text_encoder = _seeded(
        seed, half, lambda: CLIPTextModel(CLIPTextConfig(**configs["text_encoder"]))
    )
    # SDXL was trained with the same noise schedule and sampler settings as SD 1.5.
    scheduler = EulerDiscreteScheduler(**_sd15_betas(), steps_offset=1, timestep_spacing="leading")
    if "text_encoder_2" in configs:
        # A seed of its own, so that the two encoders do not start out identical.
        text_encoder_2 = _seeded(
            seed + 1,
            half,
            lambda: CLIPTextModelWithProjection(CLIPTextConfig(**configs["text_encoder_2"])),
        )
        return StableDiffusionXLPipeline(
            vae=vae,
            text_encoder=text_encoder,
            text_encoder_2=text_encoder_2,
            tokenizer=tokenizer,
            tokenizer_2=tokenizer,
            unet=unet,
            scheduler=scheduler,
        )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def synthesize(target: Path, size: str = "tiny", seed: int = 0) -> Path:
    _check_size(size)
    target = Path(target)
    if not is_free(target):
        raise FileExistsError(
            f"Refusing to overwrite {target}: it already exists and is not empty."
        )
    with staged_folder(target) as staging:
        _write_pipeline(staging, size, seed)
    logger.info("Synthesized %s model with seed %d at %s", size, seed, target)
    return target


def _match_file_modes(folder: Path, reference: str = "model_index.json") -> None:
    # safetensors writes weights through a private (0600) temporary file; give
    # them the umask-derived mode of the other files so that a service running
    # as another user can read a model that an administrator synthesized.
    mode = (folder / reference).stat().st_mode & 0o777
    for path in folder.rglob("*"):
        if path.is_file() and path.stat().st_mode & 0o777 != mode:
            path.chmod(mode)


def _write_pipeline(folder: Path, size: str, seed: int) -> None:
    configs = architecture_configs(size)
    tokenizer = write_tokenizer(folder / "tokenizer")
    if "text_encoder_2" in configs:
        # The second encoder reads prompts with the same tokenizer; written the
        # same way, its folder also has the vocabulary files slow tokenizers read.
        write_tokenizer(folder / "tokenizer_2")
    # Half precision halves the 4 GB of full-size random weights (loaders
    # upcast on demand); casting each model as it is built also lowers peak memory.
    pipeline = _build_pipeline(configs, tokenizer, seed, half=size == "sd15")
    pipeline.save_pretrained(folder, safe_serialization=True)
    _match_file_modes(folder)


# LoRA adapters

LORA_WEIGHTS_FILE = "pytorch_lora_weights.safetensors"
# The attention projections, where LoRA training scripts put their adapters.
LORA_TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0")
# Spread of the random LoRA matrices: trained adapters are not zero, and these
# must change a tiny model's images visibly (PEFT starts lora_B at zero,
# an adapter that changes nothing).
LORA_WEIGHT_STD = 0.5


def synthesize_lora(
    target: Path, base_model: Path, base_models: list[str], seed: int = 0, rank: int = 4
) -> Path:
    """Write an installed-adapter folder: a LoRA with random weights for the UNet of the
    pipeline in `base_model`, and lora.json naming the models it is meant for."""
    target, base_model = Path(target), Path(base_model)
    if not is_free(target):
        raise FileExistsError(
            f"Refusing to overwrite {target}: it already exists and is not empty."
        )
    pipeline_class = _pipeline_class(base_model)
    layers = _random_unet_lora(base_model / "unet", seed, rank)
    with staged_folder(target) as staging:
        (staging / LORA_DECLARATION).write_text(
            json.dumps({"base_models": list(base_models)}), encoding="utf-8"
        )
        pipeline_class.save_lora_weights(
            staging,
            # No adapter metadata: safetensors writes metadata in a random key
            # order, so the same seed would not give the same bytes. Loaders then
            # take alpha = rank, which is what the layers were made with.
            unet_lora_layers=layers,
            weight_name=LORA_WEIGHTS_FILE,
            safe_serialization=True,
        )
        _match_file_modes(staging, reference=LORA_DECLARATION)
    logger.info("Synthesized a LoRA of rank %d with seed %d at %s", rank, seed, target)
    return target


def _pipeline_class(model: Path) -> Any:
    import diffusers

    index = json.loads((model / "model_index.json").read_text(encoding="utf-8"))
    return getattr(diffusers, index["_class_name"])


def _random_unet_lora(unet_folder: Path, seed: int, rank: int) -> dict[str, torch.Tensor]:
    import torch
    from diffusers import UNet2DConditionModel
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig, get_peft_model_state_dict

    # PEFT gives the LoRA layers' names and shapes; their values are drawn below,
    # so neither the base weights nor PEFT's initial values are ever made.
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(unet_folder))
        unet.add_adapter(LoraConfig(r=rank, target_modules=list(LORA_TARGET_MODULES)))
    shapes = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    generator = torch.Generator().manual_seed(seed)
    layers = {
        name: torch.randn(tuple(shapes[name].shape), generator=generator) * LORA_WEIGHT_STD
        for name in sorted(shapes)
    }
    return layers
