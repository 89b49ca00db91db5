import json
import logging
import shutil
import time
from pathlib import Path

import huggingface_hub.constants
import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPImageProcessor

from appliance.engine.hub import ModelPullError, pipeline_components, pull, select_files
from appliance.engine.pipeline import (
    ModelLoadError,
    generate,
    load_pipeline,
    pick_device,
    pick_dtype,
    render,
)
from appliance.engine.synth import synthesize

FAST = {"width": 64, "height": 64, "steps": 2, "guidance": 7.5}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synthesize(tmp_path_factory.mktemp("engine") / "tiny", seed=0)


@pytest.fixture(scope="module")
def pipe(model_dir: Path):
    return load_pipeline(model_dir, "cpu", torch.float32)


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def _copy_model(model_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(model_dir, tmp_path / "copy"))


# Device and dtype choice


def test_auto_device_without_cuda_is_cpu(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick_device("auto") == "cpu"
    assert pick_device("cpu") == "cpu"


@pytest.mark.parametrize("requested", ["cuda", "cuda:1"])
def test_cuda_without_gpu_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, requested: str):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="no usable CUDA GPU"):
        pick_device(requested)


def test_cuda_index_beyond_the_gpus_is_refused(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert pick_device("auto") == "cuda"
    assert pick_device("cuda:0") == "cuda:0"
    with pytest.raises(ValueError, match="only 1 CUDA GPU"):
        pick_device("cuda:1")


def test_unknown_device_is_refused():
    with pytest.raises(ValueError, match="auto, cpu, cuda or cuda:N"):
        pick_device("tpu")


def test_dtype_choice():
    assert pick_dtype("auto", "cpu") == torch.float32
    assert pick_dtype("auto", "cuda") == torch.float16
    assert pick_dtype("auto", "cuda:1") == torch.float16
    assert pick_dtype("bfloat16", "cuda") == torch.bfloat16
    assert pick_dtype("float32", "cuda") == torch.float32
    assert pick_dtype("float16", "cuda") == torch.float16


def test_half_precision_on_cpu_falls_back_with_a_warning(caplog: pytest.LogCaptureFixture):
    with caplog.at_level(logging.WARNING, logger="appliance.engine.pipeline"):
        assert pick_dtype("float16", "cpu") == torch.float32
    assert "float32" in caplog.text


def test_unknown_dtype_is_refused():
    with pytest.raises(ValueError, match="float32"):
        pick_dtype("int8", "cpu")


# Loading


def test_missing_folder_is_a_load_error(tmp_path: Path):
    missing = tmp_path / "nowhere"
    with pytest.raises(ModelLoadError, match="nowhere"):
        load_pipeline(missing, "cpu", torch.float32)


def test_folder_without_model_index_is_a_load_error(tmp_path: Path):
    (tmp_path / "unet").mkdir()
    with pytest.raises(ModelLoadError, match=r"model_index\.json"):
        load_pipeline(tmp_path, "cpu", torch.float32)


def test_broken_weights_are_a_load_error(model_dir: Path, tmp_path: Path):
    broken = _copy_model(model_dir, tmp_path)
    (broken / "unet/diffusion_pytorch_model.safetensors").write_bytes(b"not weights")
    with pytest.raises(ModelLoadError, match=str(broken)):
        load_pipeline(broken, "cpu", torch.float32)


def test_loaded_pipeline_is_ready(pipe):
    assert pipe.device.type == "cpu"
    assert pipe.unet.dtype == torch.float32
    assert pipe.vae_scale_factor == 8


def test_layout_with_safety_checker_entries_loads_without_it(model_dir: Path, tmp_path: Path):
    # Real SD 1.5 folders list a safety checker; the appliance never loads it.
    folder = _copy_model(model_dir, tmp_path)
    index = json.loads((folder / "model_index.json").read_text())
    index["safety_checker"] = ["stable_diffusion", "StableDiffusionSafetyChecker"]
    index["feature_extractor"] = ["transformers", "CLIPImageProcessor"]
    index["requires_safety_checker"] = True
    (folder / "model_index.json").write_text(json.dumps(index))
    CLIPImageProcessor().save_pretrained(folder / "feature_extractor")
    loaded = load_pipeline(folder, "cpu", torch.float32)
    assert loaded.safety_checker is None


def test_half_precision_variant_files_are_found(model_dir: Path, tmp_path: Path):
    # Pulled models may carry only the ".fp16." variant file names.
    folder = _copy_model(model_dir, tmp_path)
    for weights in folder.glob("*/*.safetensors"):
        weights.rename(weights.with_name(weights.name.replace(".safetensors", ".fp16.safetensors")))
    loaded = load_pipeline(folder, "cpu", torch.float32)
    assert loaded.unet.dtype == loaded.text_encoder.dtype == torch.float32


def test_mixed_variant_and_plain_files_load(model_dir: Path, tmp_path: Path):
    folder = _copy_model(model_dir, tmp_path)
    unet_weights = folder / "unet/diffusion_pytorch_model.safetensors"
    unet_weights.rename(unet_weights.with_name("diffusion_pytorch_model.fp16.safetensors"))
    loaded = load_pipeline(folder, "cpu", torch.float32)
    assert loaded.unet.dtype == torch.float32


# Generation


def test_batch_gives_rgb_images_of_the_requested_size(pipe):
    images = generate(pipe, ["a cat", "a dog"], [1, 2], **FAST)
    assert len(images) == 2
    for image in images:
        assert image.mode == "RGB"
        assert image.size == (64, 64)
        assert _pixels(image).std() > 5


def test_width_and_height_are_respected(pipe):
    (image,) = generate(pipe, ["a wide cat"], [1], width=96, height=64, steps=1, guidance=7.5)
    assert image.size == (96, 64)


def test_same_seed_gives_the_same_image(pipe):
    first = generate(pipe, ["a cat"], [42], **FAST)[0]
    second = generate(pipe, ["a cat"], [42], **FAST)[0]
    assert np.array_equal(_pixels(first), _pixels(second))


def test_other_seed_gives_another_image(pipe):
    first, second = generate(pipe, ["a cat", "a cat"], [42, 43], **FAST)
    assert np.abs(_pixels(first) - _pixels(second)).mean() > 5


def test_image_depends_only_on_its_own_seed_not_the_batch(pipe):
    alone = generate(pipe, ["a cat"], [42], **FAST)[0]
    in_batch = generate(pipe, ["a dog in the snow", "a cat"], [7, 42], **FAST)[1]
    difference = np.abs(_pixels(alone) - _pixels(in_batch))
    # CPU kernels may sum in another order for another batch size, which can
    # flip a pixel by one level; a leak between images would change them all.
    assert difference.max() <= 1
    assert (difference > 0).mean() < 0.01


def test_negative_prompt_changes_the_image(pipe):
    plain = generate(pipe, ["a cat"], [42], **FAST)[0]
    steered = generate(pipe, ["a cat"], [42], negative_prompt="blurry", **FAST)[0]
    assert not np.array_equal(_pixels(plain), _pixels(steered))


class NoNegativePromptPipeline:
    """A stand-in for a pipeline whose call takes no negative prompt (as FLUX's), making
    grey images; it keeps the keywords it was called with."""

    device = torch.device("cpu")
    vae_scale_factor = 8

    def __init__(self) -> None:
        self.calls: list[dict] = []

    def __call__(self, prompt, width, height, num_inference_steps, guidance_scale, generator,
                 output_type):
        self.calls.append({"prompt": prompt, "output_type": output_type})
        images = torch.full((len(prompt), 3, height, width), 0.5)
        return type("Output", (), {"images": images})()


def test_a_pipeline_without_negative_prompts_is_called_without_one_or_refuses_it():
    pipe = NoNegativePromptPipeline()
    pixels = render(pipe, ["a cat"], [1], width=64, height=64, steps=1, guidance=0.0)
    assert pixels.shape == (1, 64, 64, 3) and pipe.calls == [
        {"prompt": ["a cat"], "output_type": "pt"}]
    with pytest.raises(ValueError, match=r"\(NoNegativePromptPipeline\) takes no negative"):
        render(pipe, ["a cat"], [1], width=64, height=64, steps=1, guidance=0.0,
               negative_prompt="blurry")


def test_each_prompt_needs_a_seed(pipe):
    with pytest.raises(ValueError, match="seed"):
        generate(pipe, ["a cat", "a dog"], [1], **FAST)


def test_size_must_fit_the_latent_grid(pipe):
    with pytest.raises(ValueError, match="multiples of 8"):
        generate(pipe, ["a cat"], [1], width=60, height=64, steps=1, guidance=7.5)


# Model download (no network here, so only the offline behaviour is exercised)


SD15_REPO_FILES = [
    ".gitattributes",
    "README.md",
    "model_index.json",
    "v1-5-pruned.ckpt",
    "v1-5-pruned-emaonly.safetensors",
    "feature_extractor/preprocessor_config.json",
    "safety_checker/config.json",
    "safety_checker/model.safetensors",
    "safety_checker/model.fp16.safetensors",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
    "text_encoder/model.fp16.safetensors",
    "text_encoder/pytorch_model.bin",
    "text_encoder/flax_model.msgpack",
    "tokenizer/merges.txt",
    "tokenizer/special_tokens_map.json",
    "tokenizer/tokenizer_config.json",
    "tokenizer/vocab.json",
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
    "unet/diffusion_pytorch_model.fp16.safetensors",
    "unet/diffusion_pytorch_model.non_ema.safetensors",
    "unet/diffusion_pytorch_model.bin",
    "unet/diffusion_flax_model.msgpack",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
    "vae/diffusion_pytorch_model.fp16.safetensors",
    "vae/diffusion_pytorch_model.bin",
    "onnx/unet/model.onnx",
]
SD15_MODEL_INDEX = {
    "_class_name": "StableDiffusionPipeline",
    "_diffusers_version": "0.6.0",
    "feature_extractor": ["transformers", "CLIPImageProcessor"],
    "safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"],
    "requires_safety_checker": True,
    "scheduler": ["diffusers", "PNDMScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}


def test_pipeline_components_come_from_the_model_index():
    assert pipeline_components(SD15_MODEL_INDEX) == [
        "feature_extractor",
        "safety_checker",
        "scheduler",
        "text_encoder",
        "tokenizer",
        "unet",
        "vae",
    ]
    assert "image_encoder" not in pipeline_components({"image_encoder": [None, None]})


def test_pull_selects_half_precision_safetensors_and_configs():
    selected = select_files(SD15_REPO_FILES, pipeline_components(SD15_MODEL_INDEX))
    assert sorted(selected) == [
        "feature_extractor/preprocessor_config.json",
        "model_index.json",
        "scheduler/scheduler_config.json",
        "text_encoder/config.json",
        "text_encoder/model.fp16.safetensors",
        "tokenizer/merges.txt",
        "tokenizer/special_tokens_map.json",
        "tokenizer/tokenizer_config.json",
        "tokenizer/vocab.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.fp16.safetensors",
        "vae/config.json",
        "vae/diffusion_pytorch_model.fp16.safetensors",
    ]


def test_pull_falls_back_to_full_precision_then_pickles():
    files = [
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "unet/diffusion_pytorch_model.non_ema.safetensors",
        "unet/diffusion_pytorch_model.bin",
        "vae/config.json",
        "vae/diffusion_pytorch_model.bin",
        "vae/diffusion_pytorch_model.fp16.bin",
        "vae/diffusion_flax_model.msgpack",
    ]
    assert select_files(files, ["unet", "vae"]) == [
        "model_index.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "vae/config.json",
        "vae/diffusion_pytorch_model.bin",
    ]


def test_pull_keeps_the_shard_index_of_sharded_weights():
    files = [
        "transformer/config.json",
        "transformer/diffusion_pytorch_model-00001-of-00002.safetensors",
        "transformer/diffusion_pytorch_model-00002-of-00002.safetensors",
        "transformer/diffusion_pytorch_model.safetensors.index.json",
        "transformer/diffusion_pytorch_model.bin.index.json",
    ]
    assert select_files(files, ["transformer"]) == ["model_index.json", *files[:4]]


def test_pull_prefers_sharded_half_precision_weights():
    files = [
        "text_encoder_2/config.json",
        "text_encoder_2/model-00001-of-00002.safetensors",
        "text_encoder_2/model-00002-of-00002.safetensors",
        "text_encoder_2/model.safetensors.index.json",
        "text_encoder_2/model.fp16-00001-of-00002.safetensors",
        "text_encoder_2/model.fp16-00002-of-00002.safetensors",
        "text_encoder_2/model.safetensors.index.fp16.json",
    ]
    assert select_files(files, ["text_encoder_2"]) == [
        "model_index.json",
        "text_encoder_2/config.json",
        "text_encoder_2/model.fp16-00001-of-00002.safetensors",
        "text_encoder_2/model.fp16-00002-of-00002.safetensors",
        "text_encoder_2/model.safetensors.index.fp16.json",
    ]


def test_pull_offline_is_a_pull_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    started = time.monotonic()
    with pytest.raises(ModelPullError, match="some-org/some-model"):
        pull("some-org/some-model", tmp_path / "model")
    assert time.monotonic() - started < 10
    assert not (tmp_path / "model").exists()


def test_pull_from_unreachable_hub_is_a_pull_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")
    started = time.monotonic()
    with pytest.raises(ModelPullError, match="some-org/some-model"):
        pull("some-org/some-model", tmp_path / "model")
    assert time.monotonic() - started < 10


def test_pull_of_an_invalid_repo_id_is_a_pull_error(tmp_path: Path):
    with pytest.raises(ModelPullError, match="not a valid"):
        pull("not a repo id!", tmp_path / "model")
