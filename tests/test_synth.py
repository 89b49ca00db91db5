import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel
from safetensors.torch import load_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from appliance.engine import synth
from appliance.engine.pipeline import load_pipeline, render
from appliance.engine.synth import (
    LORA_TARGET_MODULES,
    LORA_WEIGHTS_FILE,
    architecture_configs,
    synthesize,
    synthesize_lora,
)
from appliance.jobs.catalog import LORA_DECLARATION

PIPELINE_FILES = [
    "model_index.json",
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
    "tokenizer/vocab.json",
    "tokenizer/merges.txt",
    "tokenizer/tokenizer_config.json",
    "scheduler/scheduler_config.json",
]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synthesize(tmp_path_factory.mktemp("synth") / "tiny", size="tiny", seed=0)


def _file_bytes(folder: Path) -> dict[str, bytes]:
    return {
        str(path.relative_to(folder)): path.read_bytes()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def _parameter_count(model) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


def test_tiny_model_is_a_complete_pipeline_folder(tiny_model: Path):
    for relative in PIPELINE_FILES:
        assert (tiny_model / relative).is_file(), relative
    index = json.loads((tiny_model / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["safety_checker"] == [None, None]
    assert index["feature_extractor"] == [None, None]
    assert index["requires_safety_checker"] is False


def test_all_files_share_one_mode(tiny_model: Path):
    modes = {path.stat().st_mode & 0o777 for path in tiny_model.rglob("*") if path.is_file()}
    assert len(modes) == 1


def test_tiny_model_is_small_on_disk(tiny_model: Path):
    total = sum(len(content) for content in _file_bytes(tiny_model).values())
    assert total < 5 * 1024 * 1024


def test_no_staging_folders_are_left_behind(tiny_model: Path):
    assert [path.name for path in tiny_model.parent.iterdir()] == ["tiny"]


def test_same_seed_gives_byte_identical_files(tiny_model: Path, tmp_path: Path):
    again = synthesize(tmp_path / "again", seed=0)
    assert _file_bytes(again) == _file_bytes(tiny_model)


def test_other_seed_gives_other_weights(tiny_model: Path, tmp_path: Path):
    other = synthesize(tmp_path / "other", seed=1)
    weights = "unet/diffusion_pytorch_model.safetensors"
    assert (other / weights).read_bytes() != (tiny_model / weights).read_bytes()


def test_default_image_size_is_64_with_sd_vae_scale(tiny_model: Path):
    unet = json.loads((tiny_model / "unet/config.json").read_text())
    vae = json.loads((tiny_model / "vae/config.json").read_text())
    vae_scale_factor = 2 ** (len(vae["block_out_channels"]) - 1)
    assert vae_scale_factor == 8
    assert unet["sample_size"] * vae_scale_factor == 64


def test_tokenizer_round_trip(tiny_model: Path):
    tokenizer = CLIPTokenizer.from_pretrained(tiny_model / "tokenizer")
    text_config = json.loads((tiny_model / "text_encoder/config.json").read_text())
    assert tokenizer.model_max_length == 77
    assert tokenizer.pad_token == tokenizer.eos_token == "<|endoftext|>"
    assert tokenizer.bos_token == "<|startoftext|>"
    assert len(tokenizer) <= text_config["vocab_size"]
    assert text_config["eos_token_id"] == tokenizer.eos_token_id
    ids = tokenizer("A photo of a cat on the beach, highly detailed").input_ids
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    # Learned merges turn common words into single tokens.
    assert len(ids) == 13
    assert max(ids) < text_config["vocab_size"]


def test_tokenizer_covers_every_byte(tiny_model: Path):
    tokenizer = CLIPTokenizer.from_pretrained(tiny_model / "tokenizer")
    text = "naïve café ☕ \x01 zxqj!!"
    decoded = tokenizer.decode(tokenizer(text).input_ids, skip_special_tokens=True)
    # Decoding re-inserts word breaks as spaces; nothing may be lost as unknown.
    assert decoded.replace(" ", "") == text.replace(" ", "")


def test_vocab_has_clip_layout():
    merges = synth.learn_merges(synth.MERGE_SOURCE_WORDS)
    vocab = synth.build_vocab(merges)
    assert len(vocab) == 512 + len(merges) + 2
    assert vocab["a"] == 64 and vocab["a</w>"] == 256 + 64
    assert vocab["<|endoftext|>"] == len(vocab) - 1
    assert vocab["<|startoftext|>"] == len(vocab) - 2
    assert synth.learn_merges(synth.MERGE_SOURCE_WORDS) == merges


def test_learn_merges_joins_the_most_frequent_pairs_first():
    merges = synth.learn_merges(["cat", "cat", "hat", "at"], max_merges=2)
    assert merges == [("a", "t</w>"), ("c", "at</w>")]


def test_existing_non_empty_target_is_refused(tmp_path: Path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        synthesize(target)
    assert [path.name for path in target.iterdir()] == ["keep.txt"]


def test_empty_target_folder_is_filled(tmp_path: Path):
    target = tmp_path / "model"
    target.mkdir()
    synthesize(target)
    assert (target / "model_index.json").is_file()


def test_unknown_size_names_the_allowed_ones(tmp_path: Path):
    with pytest.raises(ValueError, match=r"tiny.*sd15"):
        synthesize(tmp_path / "model", size="huge")
    with pytest.raises(ValueError, match=r"tiny.*sd15"):
        architecture_configs("huge")
    assert not (tmp_path / "model").exists()


def test_crash_while_writing_leaves_no_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    def write_half_and_fail(folder: Path, size: str, seed: int) -> None:
        (folder / "model_index.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(synth, "_write_pipeline", write_half_and_fail)
    with pytest.raises(KeyboardInterrupt):
        synthesize(tmp_path / "model")
    assert list(tmp_path.iterdir()) == []


def test_sd15_architecture_matches_stable_diffusion_1_5():
    configs = architecture_configs("sd15")
    with init_empty_weights():
        unet = UNet2DConditionModel(**configs["unet"])
        vae = AutoencoderKL(**configs["vae"])
        text_encoder = CLIPTextModel(CLIPTextConfig(**configs["text_encoder"]))
    assert _parameter_count(unet) == 859_520_964
    assert _parameter_count(vae) == 83_653_863
    assert _parameter_count(text_encoder) == 123_060_480
    assert configs["text_encoder"]["hidden_act"] == "quick_gelu"
    assert configs["vae"]["scaling_factor"] == 0.18215


def test_sd15_text_encoder_covers_the_generated_tokenizer():
    text_config = architecture_configs("sd15")["text_encoder"]
    vocab = synth.build_vocab(synth.learn_merges(synth.MERGE_SOURCE_WORDS))
    assert len(vocab) <= text_config["vocab_size"]
    assert text_config["eos_token_id"] == vocab["<|endoftext|>"]


def test_importing_synth_loads_no_torch():
    # The command line reads ALLOWED_SIZES when it starts; torch takes seconds to import.
    script = ("import sys, appliance.engine.synth\n"
              "print(sorted(m for m in sys.modules if m.split('.')[0] in "
              "('torch', 'diffusers', 'transformers', 'peft')))")
    loaded = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            check=True).stdout.strip()
    assert loaded == "[]"


# Tiny SDXL

SDXL_FILES = [
    *PIPELINE_FILES,
    "text_encoder_2/config.json",
    "text_encoder_2/model.safetensors",
    "tokenizer_2/vocab.json",
    "tokenizer_2/merges.txt",
    "tokenizer_2/tokenizer_config.json",
]


@pytest.fixture(scope="module")
def tiny_sdxl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synthesize(tmp_path_factory.mktemp("synth-sdxl") / "tiny-sdxl", "tiny-sdxl", seed=0)


@pytest.fixture(scope="module")
def tiny_sdxl_pipe(tiny_sdxl: Path):
    return load_pipeline(tiny_sdxl, "cpu", torch.float32)


def _render_64(pipe) -> torch.Tensor:
    return render(pipe, ["a red fox in the snow"], [7], width=64, height=64, steps=2,
                  guidance=5.0, negative_prompt=None, vae_chunk=1)


def test_tiny_sdxl_is_a_complete_sdxl_folder(tiny_sdxl: Path):
    for relative in SDXL_FILES:
        assert (tiny_sdxl / relative).is_file(), relative
    index = json.loads((tiny_sdxl / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline"
    total = sum(len(content) for content in _file_bytes(tiny_sdxl).values())
    assert total < 5 * 1024 * 1024
    modes = {path.stat().st_mode & 0o777 for path in tiny_sdxl.rglob("*") if path.is_file()}
    assert len(modes) == 1


def test_tiny_sdxl_unet_is_conditioned_on_both_encoders(tiny_sdxl: Path):
    unet = json.loads((tiny_sdxl / "unet/config.json").read_text())
    first = json.loads((tiny_sdxl / "text_encoder/config.json").read_text())
    second = json.loads((tiny_sdxl / "text_encoder_2/config.json").read_text())
    assert second["architectures"] == ["CLIPTextModelWithProjection"]
    assert unet["addition_embed_type"] == "text_time"
    assert unet["cross_attention_dim"] == first["hidden_size"] + second["hidden_size"]
    # Six time ids, each embedded, beside the second encoder's pooled projection.
    assert unet["projection_class_embeddings_input_dim"] == (
        6 * unet["addition_time_embed_dim"] + second["projection_dim"])
    assert unet["sample_size"] * 8 == 64


def test_tiny_sdxl_same_seed_gives_byte_identical_files(tiny_sdxl: Path, tmp_path: Path):
    again = synthesize(tmp_path / "again", "tiny-sdxl", seed=0)
    assert _file_bytes(again) == _file_bytes(tiny_sdxl)
    other = synthesize(tmp_path / "other", "tiny-sdxl", seed=1)
    weights = "text_encoder_2/model.safetensors"
    assert (other / weights).read_bytes() != (tiny_sdxl / weights).read_bytes()


def test_tiny_sdxl_loads_as_an_sdxl_pipeline_and_renders_64px(tiny_sdxl_pipe):
    assert isinstance(tiny_sdxl_pipe, StableDiffusionXLPipeline)
    pixels = _render_64(tiny_sdxl_pipe)
    assert pixels.shape == (1, 64, 64, 3) and pixels.dtype == torch.uint8
    # Random weights give noise, not a blank image.
    assert pixels.float().std() > 5
    assert torch.equal(_render_64(tiny_sdxl_pipe), pixels)


# LoRA adapters


@pytest.fixture(scope="module")
def tiny_lora(tiny_model: Path) -> Path:
    return synthesize_lora(tiny_model.parent / "loras" / "ink", tiny_model, ["tiny"], seed=1)


def test_lora_folder_names_its_base_models(tiny_lora: Path):
    assert sorted(path.name for path in tiny_lora.iterdir()) == [LORA_DECLARATION,
                                                                 LORA_WEIGHTS_FILE]
    assert json.loads((tiny_lora / LORA_DECLARATION).read_text()) == {"base_models": ["tiny"]}
    modes = {path.stat().st_mode & 0o777 for path in tiny_lora.iterdir()}
    assert len(modes) == 1


def test_lora_covers_the_unet_attention_projections_with_nonzero_weights(tiny_lora: Path):
    weights = load_file(tiny_lora / LORA_WEIGHTS_FILE)
    assert all(name.startswith("unet.") for name in weights)
    for target in LORA_TARGET_MODULES:
        assert any(f".{target}.lora" in name for name in weights), target
    # PEFT starts its up-projections at zero: such an adapter would change nothing.
    assert all(tensor.abs().max() > 0.1 for tensor in weights.values())


def test_lora_rank_is_the_one_asked_for(tiny_model: Path, tmp_path: Path):
    lora = synthesize_lora(tmp_path / "rank8", tiny_model, ["tiny"], rank=8)
    shapes = {tuple(tensor.shape) for tensor in load_file(lora / LORA_WEIGHTS_FILE).values()}
    assert all(8 in shape for shape in shapes)


def test_lora_same_seed_gives_identical_weights(tiny_lora: Path, tiny_model: Path,
                                                tmp_path: Path):
    again = synthesize_lora(tmp_path / "again", tiny_model, ["tiny"], seed=1)
    other = synthesize_lora(tmp_path / "other", tiny_model, ["tiny"], seed=2)
    weights = (tiny_lora / LORA_WEIGHTS_FILE).read_bytes()
    assert (again / LORA_WEIGHTS_FILE).read_bytes() == weights
    assert (other / LORA_WEIGHTS_FILE).read_bytes() != weights


def test_lora_for_sdxl_matches_its_wider_cross_attention(tiny_sdxl: Path, tmp_path: Path):
    lora = synthesize_lora(tmp_path / "xl", tiny_sdxl, ["tiny-sdxl"])
    weights = load_file(lora / LORA_WEIGHTS_FILE)
    cross_attention = [tensor for name, tensor in weights.items()
                       if ".attn2.to_k.lora" in name and tensor.shape[0] == 4]
    assert cross_attention and all(tensor.shape == (4, 64) for tensor in cross_attention)


def test_lora_refuses_a_non_empty_target(tiny_model: Path, tmp_path: Path):
    target = tmp_path / "lora"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        synthesize_lora(target, tiny_model, ["tiny"])
    assert [path.name for path in target.iterdir()] == ["keep.txt"]
