"""Build Stable Diffusion pipelines with random weights.

A synthesized model has the real folder layout and architecture of a
diffusers text-to-image pipeline, so the whole appliance can be exercised
offline without downloading gigabytes of weights. Its images are noise.
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from appliance.core.files import is_free, staged_folder

logger = logging.getLogger(__name__)

ModelT = TypeVar("ModelT", bound=torch.nn.Module)

ALLOWED_SIZES = ("tiny", "sd15")

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
    """Config dicts for the unet, vae and text_encoder of a synthesized model."""
    _check_size(size)
    return _sd15_configs() if size == "sd15" else _tiny_configs()


def _seeded(seed: int, half: bool, build: Callable[[], ModelT]) -> ModelT:
    # Re-seeding before every model keeps each one's weights independent of
    # how many random numbers the models built before it consumed.
    torch.manual_seed(seed)
    model = build()
    return model.half() if half else model


def _build_pipeline(
    configs: dict[str, dict[str, Any]], tokenizer: CLIPTokenizer, seed: int, half: bool
) -> StableDiffusionPipeline:
    unet = _seeded(seed, half, lambda: UNet2DConditionModel(**configs["unet"]))
    vae = _seeded(seed, half, lambda: AutoencoderKL(**configs["vae"]))
    text_encoder = _seeded(
        seed, half, lambda: CLIPTextModel(CLIPTextConfig(**configs["text_encoder"]))
    )
    scheduler = EulerDiscreteScheduler(**_sd15_betas(), steps_offset=1, timestep_spacing="leading")
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


def _match_file_modes(folder: Path) -> None:
    # safetensors writes weights through a private (0600) temporary file; give
    # them the umask-derived mode of the other files so that a service running
    # as another user can read a model that an administrator synthesized.
    mode = (folder / "model_index.json").stat().st_mode & 0o777
    for path in folder.rglob("*"):
        if path.is_file() and path.stat().st_mode & 0o777 != mode:
            path.chmod(mode)


def _write_pipeline(folder: Path, size: str, seed: int) -> None:
    tokenizer = write_tokenizer(folder / "tokenizer")
    # Half precision halves the 4 GB of full-size random weights (loaders
    # upcast on demand); casting each model as it is built also lowers peak memory.
    pipeline = _build_pipeline(architecture_configs(size), tokenizer, seed, half=size == "sd15")
    pipeline.save_pretrained(folder, safe_serialization=True)
    _match_file_modes(folder)
