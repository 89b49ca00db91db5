from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

import pytest

from appliance.core.config import SECTIONS, Config, ConfigError, load_config

ROOT = Path(__file__).resolve().parent.parent


def test_shipped_config_documents_every_setting_with_its_default():
    shipped = tomllib.loads((ROOT / "config.toml").read_text())
    declared = {name: {f.name: f.default for f in dataclasses.fields(cls)}
                for name, cls in SECTIONS.items()}
    assert set(shipped) == set(declared)
    for section, values in declared.items():
        assert set(shipped[section]) == set(values), section
        for key, default in values.items():
            assert type(default)(shipped[section][key]) == default, f"{section}.{key}"


def test_shipped_config_loads_with_paths_resolved_against_its_folder():
    config = load_config(ROOT / "config.toml")
    assert config.storage.database == ROOT / "data" / "appliance.db"
    assert config.model.path == ROOT / "models" / "demo"
    assert config.images_dir == ROOT / "data" / "images"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "custom.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[server]\nport = \"80\"\n", "server.port must be an integer, got a string ('80')"),
        ("[server]\nport = 0\n", "server.port must be between 1 and 65535, got 0"),
        ("[server]\nhots = \"x\"\n", "unknown key server.hots"),
        ("[serve]\nport = 1\n", "unknown section [serve]"),
        ("[engine]\nbatch_size = true\n", "engine.batch_size must be an integer, got a boolean"),
        ("[generation]\nwidth = 500\n", "generation.width must be a multiple of 8"),
        ("[model]\ndevice = \"gpu\"\n", "model.device must be auto, cpu, cuda or cuda:N"),
        ("[model]\ndtype = \"int8\"\n", "model.dtype must be one of auto, float32"),
        ("[storage]\ndatabase = 3\n", "storage.database must be a path string"),
        ("server = 1\n", "server must be a table"),
        ("[server\n", "not valid TOML"),
        ("[engine]\nbatch_window_seconds = 5\n[health]\nworker_stall_seconds = 5\n",
         "health.worker_stall_seconds (5) must be longer than engine.batch_window_seconds (5)"),
    ],
)
def test_bad_settings_stop_with_one_line_naming_the_key(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert message in str(caught.value)
    assert str(path) in str(caught.value) and "\n" not in str(caught.value)


def test_integer_accepted_where_a_number_is_expected(tmp_path):
    config = load_config(write(tmp_path, "[generation]\nguidance_scale = 5\n"))
    assert config.generation.guidance_scale == 5.0


def test_search_order_is_option_then_environment_then_working_folder(tmp_path, monkeypatch):
    (tmp_path / "config.toml").write_text("[server]\nport = 1001\n")
    env_file = tmp_path / "env.toml"
    env_file.write_text("[server]\nport = 1002\n")
    option_file = tmp_path / "option.toml"
    option_file.write_text("[server]\nport = 1003\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("APPLIANCE_CONFIG", raising=False)
    assert load_config().server.port == 1001
    monkeypatch.setenv("APPLIANCE_CONFIG", str(env_file))
    assert load_config().server.port == 1002
    assert load_config(option_file).server.port == 1003


def test_missing_named_file_is_an_error_but_missing_default_means_defaults(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("APPLIANCE_CONFIG", raising=False)
    config = load_config()
    assert config.server.port == Config().server.port
    assert config.storage.database == tmp_path / "data" / "appliance.db"
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")
