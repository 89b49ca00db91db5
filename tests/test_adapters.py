from pathlib import Path

import pytest
import torch

from appliance.engine.adapters import AdapterLoadError, Adapters
from appliance.engine.pipeline import load_pipeline, render
from appliance.engine.synth import LORA_WEIGHTS_FILE, synthesize, synthesize_lora

ADAPTER_SEEDS = {"ink": 1, "neon": 2}


@pytest.fixture(scope="module", params=["tiny", "tiny-sdxl"])
def installed(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model folder and, in loras/, an adapter folder per name in ADAPTER_SEEDS and "broken"."""
    size = request.param
    root = tmp_path_factory.mktemp(size)
    model = synthesize(root / "model", size, seed=0)
    for name, seed in ADAPTER_SEEDS.items():
        synthesize_lora(root / "loras" / name, model, [size], seed=seed)
    broken = root / "loras" / "broken"
    broken.mkdir()
    (broken / LORA_WEIGHTS_FILE).write_bytes(b"\x00\x01 these bytes are not a LoRA " * 64)
    return root


def _path_of(installed: Path):
    return lambda name: installed / "loras" / name / LORA_WEIGHTS_FILE


def _render(pipe) -> torch.Tensor:
    return render(pipe, ["a lighthouse on a cliff at sunset"], [11], width=64, height=64,
                  steps=2, guidance=5.0, negative_prompt=None, vae_chunk=1)


@pytest.fixture(scope="module")
def base_pipe(installed: Path):
    return load_pipeline(installed / "model", "cpu", torch.float32)


@pytest.fixture(scope="module")
def base_pixels(base_pipe) -> torch.Tensor:
    return _render(base_pipe)


@pytest.fixture
def pipe(base_pipe, base_pixels):
    """The module's pipeline (loaded once: loading is most of these tests' time), back
    to the base model after each test: every adapter it loaded is removed."""
    yield base_pipe
    base_pipe.unload_lora_weights()


@pytest.fixture
def adapters(pipe, installed: Path) -> Adapters:
    return Adapters(pipe, _path_of(installed))


def _difference(pixels: torch.Tensor, other: torch.Tensor) -> float:
    return (pixels.float() - other.float()).abs().mean().item()


def _same_image(pixels: torch.Tensor, other: torch.Tensor) -> bool:
    # With LoRA layers patched in but off, SDXL's latents can move by ~1e-5
    # (float rounding), enough to flip a pixel value here and there by one.
    differences = (pixels.int() - other.int()).abs()
    return differences.max().item() <= 1 and differences.count_nonzero().item() < 0.01 * len(
        pixels.flatten())


def test_an_adapter_changes_the_image(pipe, adapters: Adapters, base_pixels: torch.Tensor):
    adapters.apply((("ink", 1.0),))
    assert _difference(_render(pipe), base_pixels) > 5
    assert adapters.loaded == {"ink"}


def test_scale_zero_gives_the_base_image(pipe, adapters: Adapters, base_pixels: torch.Tensor):
    adapters.apply((("ink", 1.0),))
    with_adapter = _render(pipe)
    adapters.apply((("ink", 0.0),))
    assert _same_image(_render(pipe), base_pixels)
    adapters.apply((("ink", 0.5),))
    assert 0 < _difference(_render(pipe), base_pixels) < _difference(with_adapter, base_pixels)


def test_no_adapters_gives_the_base_image_and_they_come_back(pipe, adapters: Adapters,
                                                             base_pixels: torch.Tensor):
    adapters.apply((("ink", 1.0),))
    with_adapter = _render(pipe)
    adapters.apply(())
    assert _same_image(_render(pipe), base_pixels)
    adapters.apply((("ink", 1.0),))
    assert torch.equal(_render(pipe), with_adapter)


def test_two_adapters_at_once(pipe, adapters: Adapters, base_pixels: torch.Tensor):
    adapters.apply((("ink", 1.0),))
    ink = _render(pipe)
    adapters.apply((("neon", 1.0),))
    neon = _render(pipe)
    adapters.apply((("ink", 1.0), ("neon", 1.0)))
    both = _render(pipe)
    assert sorted(pipe.get_active_adapters()) == ["ink", "neon"]
    for alone in (base_pixels, ink, neon):
        assert _difference(both, alone) > 1


def test_applying_the_same_adapters_again_loads_nothing(pipe, adapters: Adapters,
                                                        monkeypatch: pytest.MonkeyPatch):
    loads: list[str] = []
    load_lora_weights = pipe.load_lora_weights

    def counting_load(*args, adapter_name: str, **kwargs):
        loads.append(adapter_name)
        return load_lora_weights(*args, adapter_name=adapter_name, **kwargs)

    monkeypatch.setattr(pipe, "load_lora_weights", counting_load)
    adapters.apply((("ink", 1.0),))
    adapters.apply((("ink", 1.0),))
    adapters.apply((("ink", 1.0), ("neon", 0.5)))
    adapters.apply(())
    adapters.apply((("ink", 0.7), ("neon", 1.0)))
    assert loads == ["ink", "neon"]
    assert adapters.loaded == {"ink", "neon"}
    assert pipe.get_list_adapters()["unet"] == ["ink", "neon"]


def test_a_file_that_is_not_a_lora_is_a_clear_error(pipe, adapters: Adapters,
                                                    base_pixels: torch.Tensor):
    with pytest.raises(AdapterLoadError, match=r"LoRA adapter 'broken'"):
        adapters.apply((("broken", 1.0),))
    assert adapters.loaded == frozenset()
    assert "broken" not in pipe.get_list_adapters().get("unet", [])
    # The pipeline is still usable, with or without the adapters that do load.
    adapters.apply(())
    assert _same_image(_render(pipe), base_pixels)
    adapters.apply((("ink", 1.0),))
    assert adapters.loaded == {"ink"}


def test_a_missing_file_is_a_clear_error(pipe, installed: Path):
    adapters = Adapters(pipe, lambda name: installed / "loras" / name / LORA_WEIGHTS_FILE)
    with pytest.raises(AdapterLoadError, match=r"'gone'.*does not exist"):
        adapters.apply((("gone", 1.0),))
    assert adapters.loaded == frozenset()


def test_an_adapter_for_another_architecture_is_a_clear_error(installed: Path,
                                                              tmp_path: Path):
    # An SD 1.5 adapter in an SDXL pipeline, or the other way round: its
    # cross-attention layers have other shapes.
    index = (installed / "model" / "model_index.json").read_text()
    other_size = "tiny" if "XLPipeline" in index else "tiny-sdxl"
    other = synthesize(tmp_path / "other", other_size, seed=0)
    pipe = load_pipeline(other, "cpu", torch.float32)
    adapters = Adapters(pipe, _path_of(installed))
    with pytest.raises(AdapterLoadError, match=r"'ink'.*size mismatch"):
        adapters.apply((("ink", 1.0),))
    assert adapters.loaded == frozenset()
    assert pipe.get_list_adapters().get("unet", []) == []
