"""config.toml -> frozen dataclasses.

Every setting is declared once, here, with its default and a check; the shipped
config.toml documents the same keys (a test keeps the two in step). Anything
wrong stops startup with one line naming the key.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

CONFIG_ENV = "APPLIANCE_CONFIG"


class ConfigError(Exception):
    """A config problem, worded as one line for the operator."""


def _setting(default: Any, check: Callable[[Any], str | None] | None = None) -> Any:
    return field(default=default, metadata={"check": check})


def _between(low: float, high: float) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        if not low <= value <= high:
            return f"must be between {low} and {high}, got {value}"
        return None

    return check


def _one_of(*allowed: str) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        if value not in allowed:
            return f"must be one of {', '.join(allowed)}, got {value!r}"
        return None

    return check


def _device(value: str) -> str | None:
    if value in ("auto", "cpu", "cuda") or (value.startswith("cuda:") and value[5:].isdigit()):
        return None
    return f"must be auto, cpu, cuda or cuda:N, got {value!r}"


def _image_side(value: int) -> str | None:
    if value % 8 or not 64 <= value <= 2048:
        return f"must be a multiple of 8 between 64 and 2048, got {value}"
    return None


def _not_empty(value: str) -> str | None:
    return None if value.strip() else "must not be empty"


@dataclass(frozen=True)
class ServerConfig:
    host: str = _setting("127.0.0.1", _not_empty)
    port: int = _setting(8000, _between(1, 65535))


@dataclass(frozen=True)
class StorageConfig:
    data_dir: Path = _setting(Path("data"))
    database: Path = _setting(Path("data/appliance.db"))


@dataclass(frozen=True)
class ModelConfig:
    path: Path = _setting(Path("models/demo"))
    device: str = _setting("auto", _device)
    dtype: str = _setting("auto", _one_of("auto", "float32", "float16", "bfloat16"))


@dataclass(frozen=True)
class GenerationConfig:
    width: int = _setting(512, _image_side)
    height: int = _setting(512, _image_side)
    steps: int = _setting(25, _between(1, 200))
    guidance_scale: float = _setting(7.5, _between(0.0, 30.0))


@dataclass(frozen=True)
class LimitsConfig:
    max_prompts_per_request: int = _setting(100, _between(1, 10_000))
    max_prompt_length: int = _setting(1000, _between(1, 100_000))


@dataclass(frozen=True)
class EngineConfig:
    queue_capacity: int = _setting(1000, _between(1, 10_000_000))
    batch_size: int = _setting(4, _between(1, 256))


@dataclass(frozen=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    # The file the settings came from (None: embedded defaults); relative
    # paths in it were resolved against its folder.
    source: Path | None = None

    @property
    def images_dir(self) -> Path:
        return self.storage.data_dir / "images"

    @property
    def secret_file(self) -> Path:
        return self.storage.data_dir / "secret_key"


SECTIONS: dict[str, type] = {
    f.name: f.default_factory  # type: ignore[misc]
    for f in dataclasses.fields(Config)
    if f.name != "source"
}


def find_config_file(explicit: str | os.PathLike | None) -> tuple[Path | None, bool]:
    """Returns (path, must_exist): --config, else $APPLIANCE_CONFIG, else ./config.toml."""
    if explicit:
        return Path(explicit), True
    if os.environ.get(CONFIG_ENV):
        return Path(os.environ[CONFIG_ENV]), True
    return Path("config.toml"), False


def load_config(explicit: str | os.PathLike | None = None) -> Config:
    path, must_exist = find_config_file(explicit)
    if not path.exists():
        if must_exist:
            raise ConfigError(f"config file {path} does not exist")
        return config_from_dict({}, base_dir=Path.cwd(), source=None)
    try:
        with path.open("rb") as fh:
            raw = tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot be read: {exc.strerror}") from None
    try:
        return config_from_dict(raw, base_dir=path.resolve().parent, source=path.resolve())
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def config_from_dict(raw: dict[str, Any], base_dir: Path, source: Path | None = None) -> Config:
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"unknown section [{unknown[0]}]")
    sections = {}
    for name, cls in SECTIONS.items():
        values = raw.get(name, {})
        if not isinstance(values, dict):
            raise ConfigError(f"{name} must be a table ([{name}])")
        sections[name] = _build_section(name, cls, values, base_dir)
    return Config(**sections, source=source)


def _build_section(section: str, cls: type, values: dict[str, Any], base_dir: Path) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"unknown key {section}.{unknown[0]}")
    kwargs = {}
    for name, f in fields.items():
        key = f"{section}.{name}"
        value = _coerce(key, values[name], f.default) if name in values else f.default
        if isinstance(value, Path) and not value.is_absolute():
            value = base_dir / value
        check = f.metadata.get("check")
        problem = check(value) if check else None
        if problem:
            raise ConfigError(f"{key} {problem}")
        kwargs[name] = value
    return cls(**kwargs)


_TYPE_WORDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _coerce(key: str, value: Any, default: Any) -> Any:
    expected = type(default)
    if isinstance(default, Path):
        if isinstance(value, str) and value.strip():
            return Path(value).expanduser()
        raise ConfigError(f"{key} must be a path string, got {_describe(value)}")
    # bool is an int in Python; never let true stand in for a number.
    if isinstance(value, bool) and expected is not bool:
        raise ConfigError(f"{key} must be {_TYPE_WORDS[expected]}, got {_describe(value)}")
    if expected is float and isinstance(value, int):
        return float(value)
    if not isinstance(value, expected):
        raise ConfigError(f"{key} must be {_TYPE_WORDS[expected]}, got {_describe(value)}")
    return value


def _describe(value: Any) -> str:
    kinds = {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
             list: "an array", dict: "a table"}
    return f"{kinds.get(type(value), type(value).__name__)} ({value!r})"
