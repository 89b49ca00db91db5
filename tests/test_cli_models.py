"""`appliance models list`, `pull` and `remove` on a model.dir holding copies of the tiny model."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from appliance.core.numbers import size_text
from appliance.engine import hub

from .cli_helpers import invoke


@pytest.fixture
def model_dir(tmp_path, tiny_model) -> Path:
    folder = tmp_path / "models"
    for name in ("alpha", "beta"):
        shutil.copytree(tiny_model, folder / name)
    return folder


def write_config(folder: Path, model_path: str = "models/alpha", default: str = "") -> Path:
    path = folder / "config.toml"
    path.write_text('[storage]\ndata_dir = "state"\ndatabase = "state/app.db"\n'
                    f'[model]\ndir = "models"\npath = "{model_path}"\ndefault = "{default}"\n'
                    'lora_dir = "loras"\n'
                    "[models.beta]\ncredits_per_image = 3\n")
    return path


@pytest.fixture
def config_path(tmp_path, model_dir) -> Path:
    return write_config(tmp_path)


def rows(output: str) -> list[list[str]]:
    return [re.split(r" {2,}", line) for line in output.splitlines()]


def only_line(result) -> str:
    assert result.exit_code != 0
    [line] = result.output.splitlines()
    return line


def test_list_shows_each_model_its_defaults_price_and_the_adapters(tmp_path, model_dir,
                                                                   config_path):
    lora = tmp_path / "loras" / "ink"
    lora.mkdir(parents=True)
    (lora / "ink.safetensors").write_bytes(b"weights")
    (lora / "lora.json").write_text(json.dumps({"base_models": ["beta", "gamma"]}))

    result = invoke(config_path, "models", "list")

    assert result.exit_code == 0, result.output
    table = rows(result.output)
    assert table[0] == ["NAME", "PIPELINE", "SIZE", "STEPS", "CREDITS", "DISK", "PROBLEM"]
    alpha, beta = table[1], table[2]
    assert alpha[:5] == ["alpha (default)", "StableDiffusionPipeline", "512x512", "25", "1"]
    assert beta[:5] == ["beta", "StableDiffusionPipeline", "512x512", "25", "3"]
    disk = sum(path.stat().st_size for path in (model_dir / "alpha").rglob("*") if path.is_file())
    assert alpha[5] == beta[5] == size_text(disk)
    assert len(alpha) == 6  # no problem
    assert table[3] == [""]
    assert table[4:] == [["LORA", "FITS"], ["ink", "beta, gamma"]]


def test_list_says_the_demo_model_is_not_made_yet(tmp_path, model_dir):
    config_path = write_config(tmp_path, model_path="demo")

    result = invoke(config_path, "models", "list")

    demo = next(row for row in rows(result.output) if row[0].startswith("demo"))
    assert demo[0] == "demo (default)" and demo[1] == "-" and demo[5] == "-"
    assert demo[6].startswith("not created yet")


def test_remove_refuses_the_default_model(config_path, model_dir):
    line = only_line(invoke(config_path, "models", "remove", "alpha", "--yes"))
    assert line == ("appliance: 'alpha' is the default model: set model.default to another"
                    " one in the config file first")
    assert (model_dir / "alpha" / "model_index.json").is_file()


def test_remove_names_the_installed_models_for_an_unknown_one(config_path):
    line = only_line(invoke(config_path, "models", "remove", "gamma", "--yes"))
    assert line == "appliance: no model named 'gamma' is installed; installed: alpha, beta"


def test_remove_refuses_the_model_path_model_outside_model_dir(tmp_path, model_dir, tiny_model):
    shutil.copytree(tiny_model, tmp_path / "elsewhere")
    config_path = write_config(tmp_path, model_path="elsewhere", default="alpha")

    line = only_line(invoke(config_path, "models", "remove", "elsewhere", "--yes"))

    assert line.startswith("appliance: 'elsewhere' is model.path (")
    assert line.endswith("outside model.dir (" + str(model_dir) + "): change model.path in the"
                         " config file instead")
    assert (tmp_path / "elsewhere" / "model_index.json").is_file()


def test_remove_asks_then_deletes_the_folder_whole(config_path, model_dir):
    declined = invoke(config_path, "models", "remove", "beta", stdin="n\n")
    assert declined.exit_code == 1
    assert declined.output.splitlines()[-1] == "appliance: nothing removed"
    unanswered = invoke(config_path, "models", "remove", "beta")
    assert unanswered.exit_code == 1
    assert unanswered.output.splitlines()[-1] == (
        "appliance: nothing removed: no answer to the question (pass --yes to remove without"
        " asking)")
    assert (model_dir / "beta" / "model_index.json").is_file()

    removed = invoke(config_path, "models", "remove", "beta", stdin="y\n")

    assert removed.exit_code == 0, removed.output
    assert f"removed the model 'beta' ({model_dir / 'beta'})" in removed.output
    # Nothing left over, not even the hidden name it was deleted under.
    assert sorted(path.name for path in model_dir.iterdir()) == ["alpha"]
    listed = invoke(config_path, "models", "list").output
    assert [row[0] for row in rows(listed)] == ["NAME", "alpha (default)"]


@pytest.mark.parametrize(("args", "name"), [
    (["org/.hidden"], ".hidden"),
    (["org/model", "../escape"], "../escape"),
    (["org/model", "two words"], "two words"),
])
def test_pull_refuses_a_name_that_cannot_be_a_model_name(config_path, model_dir, hub_stand_in,
                                                         args, name):
    line = only_line(invoke(config_path, "models", "pull", *args))
    assert line.startswith(f"appliance: {name!r} cannot be a model's name: use letters, digits")
    assert sorted(path.name for path in model_dir.iterdir()) == ["alpha", "beta"]
    assert hub_stand_in == []


def test_pull_refuses_a_name_already_installed(config_path, model_dir, hub_stand_in):
    # The default name is the repository's last part, lowercased.
    line = only_line(invoke(config_path, "models", "pull", "org/Beta"))
    assert line == ("appliance: a model named 'beta' is already installed: remove it first"
                    " (appliance models remove beta)")
    (model_dir / "leftover").mkdir()
    line = only_line(invoke(config_path, "models", "pull", "org/model", "leftover"))
    assert line == (f"appliance: {model_dir / 'leftover'} exists but holds no model: delete it,"
                    " or choose another NAME")
    assert sorted(path.name for path in model_dir.iterdir()) == ["alpha", "beta", "leftover"]
    assert hub_stand_in == []


@pytest.fixture
def hub_stand_in(monkeypatch, tiny_model):
    """The Hub's download, replaced by a copy of the tiny model (no network here); it fails
    half-way for a repository named "org/broken"."""
    calls: list[Path] = []

    def download(repo_id: str, target: Path, revision: str | None = None) -> Path:
        calls.append(target)
        shutil.copytree(tiny_model, target, dirs_exist_ok=True)
        if repo_id == "org/broken":
            raise hub.ModelPullError("the connection dropped")
        return target

    monkeypatch.setattr(hub, "pull", download)
    return calls


def test_pull_installs_under_a_hidden_name_then_renames(config_path, model_dir, hub_stand_in):
    result = invoke(config_path, "models", "pull", "org/Gamma")

    assert result.exit_code == 0, result.output
    [staging] = hub_stand_in
    assert staging.parent == model_dir and staging.name.startswith(".")
    assert sorted(path.name for path in model_dir.iterdir()) == ["alpha", "beta", "gamma"]
    assert sorted(path.name for path in (model_dir / "gamma").iterdir()) == sorted(
        path.name for path in (model_dir / "alpha").iterdir())
    assert f"to {model_dir / 'gamma'}; a running service offers it as the model 'gamma'" in (
        result.output)


def test_a_failed_pull_installs_nothing_and_keeps_the_download(config_path, model_dir,
                                                               hub_stand_in):
    line = only_line(invoke(config_path, "models", "pull", "org/broken", "delta"))

    [staging] = hub_stand_in
    assert line == (f"appliance: the connection dropped (what was downloaded stays in {staging};"
                    " the same command resumes it)")
    assert (staging / "model_index.json").is_file()
    listed = invoke(config_path, "models", "list").output
    assert [row[0] for row in rows(listed)] == ["NAME", "alpha (default)", "beta"]
    # Another repository under the same name starts afresh rather than mixing files.
    marker = staging / "stale.txt"
    marker.write_text("from org/broken")
    assert invoke(config_path, "models", "pull", "org/other", "delta").exit_code == 0
    assert not (model_dir / "delta" / "stale.txt").exists()
    assert not staging.exists()


def test_pull_may_put_a_real_model_where_the_demo_is_not_made_yet(tmp_path, model_dir,
                                                                  hub_stand_in):
    config_path = write_config(tmp_path, model_path="models/demo")

    result = invoke(config_path, "models", "pull", "org/Demo")

    assert result.exit_code == 0, result.output
    assert (model_dir / "demo" / "model_index.json").is_file()


def test_pull_refuses_the_name_of_model_path_outside_model_dir(tmp_path, model_dir,
                                                              hub_stand_in):
    config_path = write_config(tmp_path, model_path="demo", default="alpha")

    line = only_line(invoke(config_path, "models", "pull", "org/demo"))

    assert line == f"appliance: 'demo' is the name of model.path ({tmp_path / 'demo'}): choose" \
                   " another NAME"
    assert hub_stand_in == []
