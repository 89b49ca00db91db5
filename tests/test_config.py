from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from appliance.core.config import (
    SETTINGS,
    Config,
    ConfigError,
    apply_assignments,
    config_from_dict,
    load_config,
    parse_assignment,
    render_config_toml,
)

ROOT = Path(__file__).resolve().parent.parent


def test_shipped_config_is_the_rendered_declarations() -> None:
    assert (ROOT / "config.toml").read_text() == render_config_toml(), (
        "config.toml differs from the settings declared in appliance/core/config.py;"
        " regenerate it with: python -m appliance.core.config > config.toml")


def test_rendered_config_sets_every_setting_to_its_default(tmp_path: Path) -> None:
    rendered = tomllib.loads(render_config_toml())
    assert {(section, key) for section, values in rendered.items() for key in values} == {
        (s.section, s.name) for s in SETTINGS}
    assert config_from_dict(rendered, base_dir=tmp_path) == config_from_dict({}, base_dir=tmp_path)


def test_every_setting_has_help_text() -> None:
    assert SETTINGS
    missing = [s.key for s in SETTINGS if not s.help.strip()]
    assert not missing, f"settings without help text (declare them with setting()): {missing}"


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


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("engine.batch_size=16", ("engine", "batch_size", 16)),
        (" limits.max_prompt_length = -1 ", ("limits", "max_prompt_length", -1)),
        ("generation.guidance_scale=5", ("generation", "guidance_scale", 5.0)),
        ("engine.batch_window_seconds=.25", ("engine", "batch_window_seconds", 0.25)),
        ("openai.wait_timeout=1e3", ("openai", "wait_timeout", 1000.0)),
        ("engine.channels_last=false", ("engine", "channels_last", False)),
        ("engine.compile=max-autotune", ("engine", "compile", "max-autotune")),
        ("server.allowed_hosts=a.example, b.example", ("server", "allowed_hosts",
                                                       "a.example, b.example")),
        ("engine.tiny_vae=", ("engine", "tiny_vae", "")),
        ("model.path=/models/sd15", ("model", "path", "/models/sd15")),
        ("engine.devices=all", ("engine", "devices", "all")),
        ("engine.devices=cuda:0, cuda:1", ("engine", "devices", ["cuda:0", "cuda:1"])),
        ("engine.devices=cuda:1", ("engine", "devices", ["cuda:1"])),
        ("engine.devices=", ("engine", "devices", [])),
        ("server.host=a=b", ("server", "host", "a=b")),
    ],
)
def test_assignment_is_typed_by_the_setting(text: str, expected: tuple[str, str, object]) -> None:
    section, key, value = parse_assignment(text)
    assert (section, key, value) == expected
    assert type(value) is type(expected[2])


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("engine.batch_size", "'engine.batch_size' must be section.key=value"),
        ("engin.batch_size=4", "unknown section [engin]"),
        ("batch_size=4", "unknown section [batch_size]"),
        ("engine.batchsize=4", "unknown key engine.batchsize"),
        ("engine.batch_size=4.0", "engine.batch_size must be an integer, got '4.0'"),
        ("engine.batch_size=", "engine.batch_size must be an integer, got ''"),
        ("engine.batch_size=true", "engine.batch_size must be an integer, got 'true'"),
        ("engine.batch_size=\u0661", "engine.batch_size must be an integer"),
        ("openai.wait_timeout=nan", "openai.wait_timeout must be a number, got 'nan'"),
        ("openai.wait_timeout=10s", "openai.wait_timeout must be a number, got '10s'"),
        ("engine.channels_last=yes", "engine.channels_last must be true or false, got 'yes'"),
        ("model.path=", "model.path must be a path"),
        ("engine.devices=cuda:0,,cuda:1", "engine.devices must be names separated by commas"),
    ],
)
def test_bad_assignment_is_refused_with_one_line(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_assignment(text)
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_assignments_apply_to_a_copy_and_are_checked_when_loaded(tmp_path: Path) -> None:
    raw = {"engine": {"batch_size": 4, "compile": "off"}}
    applied = apply_assignments(raw, ["engine.batch_size=16", "server.port=9000",
                                      "engine.devices=cuda:0,cuda:1"])
    assert raw == {"engine": {"batch_size": 4, "compile": "off"}}
    assert applied == {"engine": {"batch_size": 16, "compile": "off",
                                  "devices": ["cuda:0", "cuda:1"]},
                       "server": {"port": 9000}}
    config = config_from_dict(applied, base_dir=tmp_path)
    assert (config.engine.batch_size, config.engine.devices) == (16, ("cuda:0", "cuda:1"))
    with pytest.raises(ConfigError, match=r"engine\.batch_size must be between 1 and 256, got 0"):
        config_from_dict(apply_assignments(raw, ["engine.batch_size=0"]), base_dir=tmp_path)
