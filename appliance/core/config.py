"""config.toml -> frozen dataclasses.

Every setting is declared once, here, with its default and a check; the shipped
config.toml documents the same keys (a test keeps the two in step). Anything
wrong stops startup with one line naming the key.
"""

from __future__ import annotations

import dataclasses
import os
import re
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


def _devices(value: tuple[str, ...] | str) -> str | None:
    if value == "all":
        return None
    if isinstance(value, str):
        return f"must be \"all\" or a list of CUDA devices, got {value!r}"
    for device in value:
        if not (device == "cuda" or (device.startswith("cuda:") and device[5:].isdigit())):
            return f"must list CUDA devices (cuda:N), got {device!r}"
    if len({d if d != "cuda" else "cuda:0" for d in value}) != len(value):
        return f"names a device twice: {list(value)}"
    return None


def _image_side(value: int) -> str | None:
    if value % 8 or not 64 <= value <= 2048:
        return f"must be a multiple of 8 between 64 and 2048, got {value}"
    return None


def _not_empty(value: str) -> str | None:
    return None if value.strip() else "must not be empty"


def _host_names(value: str) -> str | None:
    for name in (part.strip() for part in value.split(",")):
        if name and not re.fullmatch(r"\*|(\*\.)?[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?", name):
            return f"must be host names separated by commas (or *), got {name!r}"
    return None


@dataclass(frozen=True)
class ServerConfig:
    host: str = _setting("127.0.0.1", _not_empty)
    port: int = _setting(8000, _between(1, 65535))
    # Extra names the Host header may carry (see config.toml); against DNS rebinding.
    allowed_hosts: str = _setting("", _host_names)


@dataclass(frozen=True)
class StorageConfig:
    data_dir: Path = _setting(Path("data"))
    database: Path = _setting(Path("data/appliance.db"))
    # How long a write waits for another writer before it gives up (503).
    busy_timeout_seconds: float = _setting(10.0, _between(0.0, 600.0))


@dataclass(frozen=True)
class ModelConfig:
    path: Path = _setting(Path("models/demo"))
    device: str = _setting("auto", _device)
    dtype: str = _setting("auto", _one_of("auto", "float32", "float16", "bfloat16"))


@dataclass(frozen=True)
class GenerationConfig:
    # What a request that does not say gets.
    width: int = _setting(512, _image_side)
    height: int = _setting(512, _image_side)
    steps: int = _setting(25, _between(1, 200))
    guidance_scale: float = _setting(7.5, _between(0.0, 30.0))
    # What a request may ask for.
    min_size: int = _setting(64, _image_side)
    max_size: int = _setting(1024, _image_side)
    min_steps: int = _setting(1, _between(1, 200))
    max_steps: int = _setting(100, _between(1, 200))
    min_guidance_scale: float = _setting(0.0, _between(0.0, 30.0))
    max_guidance_scale: float = _setting(20.0, _between(0.0, 30.0))

    def __post_init__(self) -> None:
        # The defaults must be requests the bounds allow.
        for name, low, high in (("width", "min_size", "max_size"),
                                ("height", "min_size", "max_size"),
                                ("steps", "min_steps", "max_steps"),
                                ("guidance_scale", "min_guidance_scale", "max_guidance_scale")):
            value, lowest, highest = getattr(self, name), getattr(self, low), getattr(self, high)
            if not lowest <= value <= highest:
                raise ConfigError(f"generation.{name} must be between generation.{low} and"
                                  f" generation.{high} ({lowest} and {highest}), got {value}")


@dataclass(frozen=True)
class LimitsConfig:
    max_prompts_per_request: int = _setting(100, _between(1, 10_000))
    max_prompt_length: int = _setting(1000, _between(1, 100_000))
    max_request_bytes: int = _setting(1_048_576, _between(1024, 1_073_741_824))
    max_pending_images_per_account: int = _setting(500, _between(1, 10_000_000))
    # 0 turns the per-key rate limit off.
    requests_per_minute_per_key: int = _setting(600, _between(0, 1_000_000))


@dataclass(frozen=True)
class EngineConfig:
    queue_capacity: int = _setting(1000, _between(1, 10_000_000))
    batch_size: int = _setting(8, _between(1, 256))
    # How long a batch may wait for more images of the same settings to arrive.
    batch_window_seconds: float = _setting(0.05, _between(0.0, 10.0))
    # () runs one worker on model.device; "all" or a list of cuda:N, one worker each.
    devices: tuple[str, ...] | str = _setting((), _devices)
    channels_last: bool = _setting(True)
    compile: str = _setting("off", _one_of("off", "default", "reduce-overhead", "max-autotune",
                                           "max-autotune-no-cudagraphs"))
    # Most images the VAE decodes at once on a GPU; 0 decodes a whole batch together.
    # The CPU decodes one at a time (see diffusers_generator.vae_chunk).
    vae_decode_chunk: int = _setting(8, _between(0, 256))
    # A folder with a diffusers AutoencoderTiny; empty uses the model's own VAE.
    tiny_vae: str = _setting("")
    png_compress_level: int = _setting(1, _between(0, 9))
    # Threads that encode and write PNGs; 0 picks half the CPU cores (1 to 8).
    png_threads: int = _setting(0, _between(0, 64))


@dataclass(frozen=True)
class OpenAIConfig:
    # Seconds POST /v1/images/generations waits for its images before it gives
    # up, cancels those not yet started and refunds them.
    wait_timeout: float = _setting(300.0, _between(1.0, 86_400.0))


@dataclass(frozen=True)
class ConsoleConfig:
    # A console session ends after this long without a request...
    idle_timeout_minutes: int = _setting(60, _between(1, 10_080))
    # ...and this long after its sign-in, however busy.
    absolute_timeout_hours: int = _setting(12, _between(1, 720))
    # Failed sign-ins counted over this window; past either limit, sign-in is refused.
    signin_window_minutes: int = _setting(15, _between(1, 1440))
    max_failed_signins_per_account: int = _setting(5, _between(1, 1000))
    max_failed_signins_per_address: int = _setting(20, _between(1, 100_000))
    # Secure cookies even on plain HTTP requests: for a TLS proxy that does not
    # say X-Forwarded-Proto (HTTPS requests get Secure cookies anyway).
    secure_cookies: bool = _setting(False)


@dataclass(frozen=True)
class HousekeepingConfig:
    # Audit rows older than this many days are deleted (the contract keeps 90).
    audit_retention_days: int = _setting(90, _between(1, 36_500))
    # Finished jobs, their image rows and PNG files older than this many days
    # are deleted; 0 keeps them forever.
    image_retention_days: int = _setting(0, _between(0, 36_500))


@dataclass(frozen=True)
class HealthConfig:
    # The engine worker counts as hung when it has not come back for this long;
    # it must exceed the longest batch. /readyz then fails and, under systemd,
    # the watchdog stops being fed so the service is restarted.
    worker_stall_seconds: int = _setting(600, _between(1, 86_400))


@dataclass(frozen=True)
class LoggingConfig:
    format: str = _setting("logfmt", _one_of("logfmt", "json"))
    level: str = _setting("info", _one_of("debug", "info", "warning", "error"))


@dataclass(frozen=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    console: ConsoleConfig = field(default_factory=ConsoleConfig)
    openai: OpenAIConfig = field(default_factory=OpenAIConfig)
    housekeeping: HousekeepingConfig = field(default_factory=HousekeepingConfig)
    health: HealthConfig = field(default_factory=HealthConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
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
    config = Config(**sections, source=source)
    _check_across_sections(config)
    return config


def _check_across_sections(config: Config) -> None:
    # The worker's heartbeat waits while a batch waits to fill: a stall limit
    # no longer than that wait would call an idle worker hung (and, under
    # systemd, have the service restarted over and over).
    stall, window = config.health.worker_stall_seconds, config.engine.batch_window_seconds
    if stall <= window:
        raise ConfigError(f"health.worker_stall_seconds ({stall}) must be longer than"
                          f" engine.batch_window_seconds ({window:g}): a worker waiting for its"
                          " batch to fill would count as hung")


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
    if isinstance(default, tuple):
        # A list of names; a word may stand for a whole list (engine.devices = "all").
        if isinstance(value, str):
            return value
        if isinstance(value, list) and all(isinstance(item, str) for item in value):
            return tuple(value)
        raise ConfigError(f"{key} must be a list of strings, got {_describe(value)}")
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
