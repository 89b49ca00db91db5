from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

import appliance.core.config as config_module
from appliance.core.config import (
    BOUNDS,
    SETTINGS,
    Between,
    Bounds,
    Config,
    ConfigError,
    MultipleBetween,
    apply_assignments,
    config_from_dict,
    fill_bounds,
    load_config,
    parse_assignment,
    render_config_toml,
)
from appliance.core.database_url import DatabaseUrl

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


@pytest.mark.parametrize(
    ("check", "words"),
    [
        (Between(1, 10_080), "1 to 10080"),
        (Between(1024, 1_073_741_824), "1024 to 1073741824"),
        (Between(1.0, 86_400.0), "1 to 86400"),
        (Between(0.0, 30.0), "0 to 30"),
        (Between(0.0, 10.0), "0 to 10"),
        (Between(0.5, 2.25), "0.5 to 2.25"),
        (MultipleBetween(step=8, low=64, high=2048), "multiples of 8 from 64 to 2048"),
    ],
)
def test_bounded_check_describes_its_range(check: Bounds, words: str) -> None:
    assert check.describe() == str(check) == words
    assert fill_bounds("Seconds ({bounds}).", check) == f"Seconds ({words})."


@pytest.mark.parametrize(
    ("check", "value", "message"),
    [
        (Between(1, 65535), 0, "must be between 1 and 65535, got 0"),
        (Between(1, 65535), 65536, "must be between 1 and 65535, got 65536"),
        (Between(0.0, 600.0), 600.5, "must be between 0.0 and 600.0, got 600.5"),
        (Between(0.0, 600.0), -1.0, "must be between 0.0 and 600.0, got -1.0"),
        (MultipleBetween(step=8, low=64, high=2048), 500,
         "must be a multiple of 8 between 64 and 2048, got 500"),
        (MultipleBetween(step=8, low=64, high=2048), 56,
         "must be a multiple of 8 between 64 and 2048, got 56"),
        (MultipleBetween(step=8, low=64, high=2048), 2056,
         "must be a multiple of 8 between 64 and 2048, got 2056"),
    ],
)
def test_bounded_check_words_its_problem_as_before(check: Bounds, value: float,
                                                   message: str) -> None:
    assert check(value) == message
    assert check(check.low) is None and check(check.high) is None


def test_placeholder_without_bounds_is_refused() -> None:
    with pytest.raises(ValueError, match="no bounds"):
        fill_bounds("Seconds ({bounds}).", None)
    assert fill_bounds("Seconds.", None) == "Seconds."


def test_bounded_help_names_its_bounds_through_the_placeholder_once() -> None:
    bounded = [s for s in SETTINGS if s.bounds is not None]
    assert bounded
    wrong = [s.key for s in bounded if s.help_template.count(BOUNDS) != 1]
    assert not wrong, f"help of bounded settings must name {BOUNDS} exactly once: {wrong}"
    unbounded = [s.key for s in SETTINGS if s.bounds is None and BOUNDS in s.help_template]
    assert not unbounded, f"{BOUNDS} in the help of settings whose check has none: {unbounded}"
    for s in bounded:
        assert s.bounds is not None
        assert s.help == s.help_template.replace(BOUNDS, s.bounds.describe())
    assert BOUNDS not in render_config_toml()


def _number_pattern(value: float) -> str:
    """A number as help text might spell it: 10080, 10,080, 10_080, 10 080, 10080.0."""
    if not float(value).is_integer():
        return re.escape(repr(value))
    digits = str(int(value))
    groups = [digits[max(0, end - 3):end] for end in range(len(digits), 0, -3)][::-1]
    return "[,_ ]?".join(groups) + r"(?:\.0+)?"


def _spells_out(text: str, bounds: Bounds) -> bool:
    """Whether `text` writes `bounds` as a literal range: "1 to 200", "between 1
    and 200", "1-200", "0 (none) to 9"."""
    low, high = (rf"(?<![\w.]){_number_pattern(n)}(?!\w|\.\d)" for n in (bounds.low, bounds.high))
    link = r"(?:\bto\b|\band\b|\bthrough\b|\.\.|-|\u2013)"
    return re.search(rf"{low}[^0-9]{{0,20}}?{link}[^0-9]{{0,20}}?{high}", text) is not None


@pytest.mark.parametrize(
    ("text", "bounds", "spelled"),
    [
        ("Minutes after which a sign-in ends (1 to 10080).", Between(1, 10_080), True),
        ("Minutes after which a sign-in ends (1 to 10,080).", Between(1, 10_080), True),
        ("Denoising steps per image (1-200).", Between(1, 200), True),
        ("Seconds, between 0.0 and 600.0.", Between(0.0, 600.0), True),
        ("PNG compression level, 0 (none) to 9 (smallest files).", Between(0, 9), True),
        ("Pixels: multiples of 8 from 64 to 2048.", MultipleBetween(step=8, low=64, high=2048),
         True),
        ("PNG compression level ({bounds}): 0 is none, 9 gives the smallest files.",
         Between(0, 9), False),
        ("Denoising steps per image (1 to 2000).", Between(1, 200), False),
        ("Threads ({bounds}); 0 uses half the CPU cores, from 1 to 8.", Between(0, 64), False),
    ],
)
def test_literal_range_is_recognised(text: str, bounds: Bounds, spelled: bool) -> None:
    assert _spells_out(text, bounds) is spelled


def test_no_help_text_spells_out_its_own_bounds() -> None:
    spelled = [s.key for s in SETTINGS if s.bounds is not None
               and (_spells_out(s.help_template, s.bounds) or _spells_out(s.heading, s.bounds))]
    assert not spelled, (f"help texts that write their check's bounds by hand (name them as"
                         f" {BOUNDS} instead): {spelled}")


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
        ("[storage]\ndatabase = \"mysql://app:s3cret@db:3306/images\"\n",
         "storage.database is a mysql:// URL; only postgresql:// URLs name a database"),
        ("[storage]\ndatabase = \"postgresql://app:s3cret@db:5432\"\n",
         "storage.database must name a host and a database"),
        ("[storage]\ndatabase = \"postgresql://app:s3cret@db:port/images\"\n",
         "storage.database is not a valid postgresql:// URL"),
        ("[model]\npath = \"https://app:s3cret@huggingface.co/runwayml/sd\"\n",
         "model.path must be a path on this machine, not a https:// URL"),
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
    assert "s3cret" not in str(caught.value)  # a URL's password is never repeated


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
    # Code run from a checkout would find the checkout's config.toml (tests/test_first_hour.py).
    monkeypatch.setattr(config_module, "CHECKOUT", tmp_path / "installed")
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


def test_a_postgresql_url_names_the_cluster_database_and_is_shown_without_its_password(tmp_path):
    path = write(tmp_path, '[storage]\ndatabase = "postgresql://app:s3cret@db.lan:5432/images"\n')
    database = load_config(path).storage.database
    assert isinstance(database, DatabaseUrl)
    assert database.url == "postgresql://app:s3cret@db.lan:5432/images"
    assert database.name == "images"
    assert str(database) == database.shown == "postgresql://app:***@db.lan:5432/images"
    assert "s3cret" not in repr(database)


def test_a_password_given_as_a_url_parameter_is_not_shown_either():
    database = DatabaseUrl("postgresql://app@db.lan/images?sslmode=require&password=s3cret")
    assert "s3cret" not in database.shown
    assert database.shown == "postgresql://app@db.lan/images?sslmode=require&password=***"
