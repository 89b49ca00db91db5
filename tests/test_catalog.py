"""The catalog of installed models and adapters: what it finds, what it refuses, and
[models.NAME] tables in the config."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from appliance.core.config import ConfigError
from appliance.core.errors import BadRequest
from appliance.jobs.catalog import Catalog, UnknownModel


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def index(folder, class_name="StableDiffusionPipeline") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": class_name}))


def test_models_are_the_pipeline_folders_named_by_their_folder(make_config, tmp_path):
    models = tmp_path / "models"
    index(models / "sd15")
    index(models / "xl", "StableDiffusionXLPipeline")
    (models / "notes").mkdir()  # no model_index.json: not a model
    index(models / ".pulling-x")  # hidden (a download in progress): not a model
    config = make_config(model={"dir": str(models)}, models={"sd15": {"credits_per_image": 2}})
    catalog = Catalog(config)
    found = {model.name: model for model in catalog.models()}
    assert sorted(found) == ["sd15", "tiny", "xl"]  # tiny: model.path, outside model.dir
    assert catalog.default_name == "tiny"
    assert found["sd15"].credits_per_image == 2 and found["xl"].credits_per_image == 1
    # An SDXL pipeline's own size, where no table sets one; the others take [generation].
    assert (found["xl"].defaults.width, found["xl"].defaults.height) == (1024, 1024)
    assert found["sd15"].defaults.width == config.generation.width


def test_a_model_installed_or_removed_is_seen_after_the_rescan_interval(make_config, tmp_path):
    clock = Clock()
    catalog = Catalog(make_config(model={"dir": str(tmp_path / "models")}), clock=clock)
    with pytest.raises(UnknownModel, match="installed: tiny"):
        catalog.model("new")
    index(tmp_path / "models" / "new")
    clock.now += 1.0
    with pytest.raises(UnknownModel):
        catalog.model("new")  # read at most every RESCAN_SECONDS
    clock.now += 1.5
    assert catalog.model("new").name == "new"
    shutil.rmtree(tmp_path / "models" / "new")
    clock.now += 2.5
    with pytest.raises(UnknownModel, match="not installed"):
        catalog.model("new")


def test_a_broken_model_is_refused_until_its_folder_changes(make_config, tmp_path):
    clock = Clock()
    index(tmp_path / "models" / "shaky")
    catalog = Catalog(make_config(model={"dir": str(tmp_path / "models")}), clock=clock)
    catalog.mark_broken("shaky", "Could not load the model: bad weights")
    with pytest.raises(UnknownModel, match="cannot be served: Could not load the model"):
        catalog.model("shaky")
    with pytest.raises(LookupError):
        catalog.served("shaky")
    # Replaced (a newer file in it): worth another try.
    clock.now += 5
    (tmp_path / "models" / "shaky" / "unet").mkdir()
    os.utime(tmp_path / "models" / "shaky" / "unet", (2e9, 2e9))
    assert catalog.model("shaky").problem is None


def test_adapters_declare_the_models_they_fit(make_config, tmp_path, caplog):
    loras = tmp_path / "loras"
    (loras / "brand").mkdir(parents=True)
    (loras / "brand" / "pytorch_lora_weights.safetensors").write_bytes(b"x")
    (loras / "brand" / "lora.json").write_text(json.dumps({"base_models": ["tiny"]}))
    (loras / "broken").mkdir()
    (loras / "broken" / "lora.json").write_text("{}")
    catalog = Catalog(make_config(model={"lora_dir": str(loras)}))
    assert [lora.name for lora in catalog.loras()] == ["brand"]
    assert catalog.lora("brand", catalog.model("tiny"), "loras[0].name").base_models == ("tiny",)
    assert sum("skipped the LoRA adapter" in r.getMessage() for r in caplog.records) == 1
    catalog.rescan()
    assert sum("skipped the LoRA adapter" in r.getMessage() for r in caplog.records) == 1
    index(tmp_path / "models" / "other")
    catalog = Catalog(make_config(model={"dir": str(tmp_path / "models"),
                                         "lora_dir": str(loras)}))
    with pytest.raises(BadRequest, match="fits tiny, not the model 'other'"):
        catalog.lora("brand", catalog.model("other"), "loras[0].name")


@pytest.mark.parametrize("table, message", [
    ({"x": {"colour": 1}}, "unknown key models.x.colour"),
    ({"x": {"credits_per_image": 0}}, "models.x.credits_per_image must be between 1"),
    ({"x": {"width": 2000}}, "models.x.width is 2000, outside [generation]'s bounds"),
    ({"x": {"steps": "many"}}, "models.x.steps must be an integer"),
    ({"x": 3}, "models.x must be a table"),
])
def test_a_bad_models_table_stops_startup_naming_the_key(make_config, table, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        make_config(models=table)


def test_the_tiny_vae_is_a_models_own_and_sdxl_never_takes_the_engines(make_config, tmp_path):
    models = tmp_path / "models"
    index(models / "sd15")
    index(models / "xl", "StableDiffusionXLPipeline")
    index(models / "xl-fast", "StableDiffusionXLPipeline")
    index(models / "plain")
    config = make_config(model={"dir": str(models)}, engine={"tiny_vae": "taesd"},
                         models={"xl-fast": {"tiny_vae": "taesdxl"}, "plain": {"tiny_vae": ""}})
    found = {model.name: model.tiny_vae for model in Catalog(config).models()}
    assert found == {"sd15": "taesd", "tiny": "taesd", "xl": "", "xl-fast": "taesdxl",
                     "plain": ""}
