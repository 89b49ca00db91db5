"""config.toml -> frozen dataclasses.

Every setting is declared once, here, as a dataclass field made by `setting()`:
its default, its check and its help text. A check with a numeric range
(`Between`, `MultipleBetween`) is the one statement of that range: the help
text names it as {bounds}, filled in from the check wherever help is shown. The
shipped config.toml is generated from these declarations (`render_config_toml`);
after changing one, regenerate it with

    python -m appliance.core.config > config.toml

(a test fails while the two differ). Anything wrong in a config file stops
startup with one line naming the key.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import socket
import sys
import textwrap
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance.core.database_url import DatabaseUrl, looks_like_url, scheme_of
from appliance.core.devices import ALL, check_device, check_device_list
from appliance.core.numbers import LARGEST_INTEGER, whole_number

CONFIG_ENV = "APPLIANCE_CONFIG"

Check = Callable[[Any], str | None]


class ConfigError(Exception):
    """A config problem, worded as one line for the operator."""


# Where a help text names its setting's bounds, which its check holds.
BOUNDS = "{bounds}"


def setting(default: Any, help: str, check: Check | None = None, *, heading: str = "") -> Any:
    """A section's field. The default's type is the type a value must have (a
    tuple: a list of names); `check` returns the problem with a value, worded to
    follow the key, or None; `help` documents it in config.toml, where `heading`,
    if given, introduces it and the settings after it. When the check has bounds
    (a `Bounds`), `help` names them once as {bounds} and never spells them out."""
    return field(default=default, metadata={"help": help, "check": check, "heading": heading})


def _number(value: float) -> str:
    """A bound as help text words it: 30.0 as "30", 1073741824 as is, 0.5 as "0.5"."""
    return str(int(value)) if float(value).is_integer() else repr(value)


class Bounds:
    """A check with a numeric range: the one place that range is written down.
    Calling it gives the problem with a value, or None; describe() gives the
    range in the words a help text's {bounds} becomes."""

    low: float
    high: float

    def __call__(self, value: Any) -> str | None:
        raise NotImplementedError

    def describe(self) -> str:
        return f"{_number(self.low)} to {_number(self.high)}"

    def __str__(self) -> str:
        return self.describe()


@dataclass(frozen=True)
class Between(Bounds):
    """A number from `low` to `high`, both included."""

    low: float
    high: float

    def __call__(self, value: Any) -> str | None:
        if not self.low <= value <= self.high:
            return f"must be between {self.low} and {self.high}, got {value}"
        return None


@dataclass(frozen=True)
class MultipleBetween(Bounds):
    """A multiple of `step` from `low` to `high`, both included."""

    step: int
    low: int
    high: int

    def __call__(self, value: Any) -> str | None:
        if value % self.step or not self.low <= value <= self.high:
            return (f"must be a multiple of {self.step} between {self.low} and {self.high},"
                    f" got {value}")
        return None

    def describe(self) -> str:
        return f"multiples of {self.step} from {_number(self.low)} to {_number(self.high)}"


def fill_bounds(help: str, check: Check | None) -> str:
    """A help text as shown: its {bounds} replaced by its check's bounds."""
    if BOUNDS not in help:
        return help
    if not isinstance(check, Bounds):
        raise ValueError(f"help text names {BOUNDS} but its check has no bounds: {help!r}")
    return help.replace(BOUNDS, check.describe())


@dataclass(frozen=True)
class Setting:
    """One declared setting, as config.toml documents it and loading checks it."""

    section: str
    name: str
    default: Any
    help_template: str  # as declared: {bounds} stands for the check's bounds
    check: Check | None
    heading: str

    @property
    def key(self) -> str:
        return f"{self.section}.{self.name}"

    @property
    def bounds(self) -> Bounds | None:
        """The check, when it has a numeric range."""
        return self.check if isinstance(self.check, Bounds) else None

    @property
    def help(self) -> str:
        """The help text as shown, with the check's bounds filled in."""
        return fill_bounds(self.help_template, self.check)


def _one_of(*allowed: str) -> Check:
    def check(value: Any) -> str | None:
        if value not in allowed:
            return f"must be one of {', '.join(allowed)}, got {value!r}"
        return None

    return check


_IMAGE_SIDE = MultipleBetween(step=8, low=64, high=2048)

_MEMORY_AMOUNT = re.compile(r"([0-9]+(?:\.[0-9]+)?) *(%|[KMGT]i?B|B)", re.IGNORECASE)
_MEMORY_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
                 "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def memory_budget_bytes(text: str, device_total: int) -> int:
    """engine.gpu_memory_budget in bytes, for a device of `device_total` bytes."""
    match = _MEMORY_AMOUNT.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"{text!r} is not a share (\"90%\") or an amount (\"20GiB\")")
    number, unit = float(match[1]), match[2].lower()
    if unit == "%":
        if not 0 < number <= 100:
            raise ValueError(f"{text!r}: a share must be above 0% and at most 100%")
        return int(device_total * number / 100)
    if number <= 0:
        raise ValueError(f"{text!r}: an amount must be above 0")
    return int(number * _MEMORY_UNITS[unit])


def _memory_amount(value: Any) -> str | None:
    try:
        memory_budget_bytes(value, 1)
    except ValueError as problem:
        return f"must be a share such as \"90%\" or an amount such as \"20GiB\": {problem}"
    return None


def _not_empty(value: str) -> str | None:
    return None if value.strip() else "must not be empty"


def _host_names(value: str) -> str | None:
    for name in (part.strip() for part in value.split(",")):
        if name and not re.fullmatch(r"\*|(\*\.)?[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?", name):
            return f"must be host names separated by commas (or *), got {name!r}"
    return None


_HEADER = (
    "AI Media Maker configuration.\n\n"
    "Every setting is shown with its default. Relative paths are resolved against the"
    " folder of this file. The service finds this file from --config, else"
    " $APPLIANCE_CONFIG, else ./config.toml, else (run from a checkout) the checkout's"
    " config.toml; without one it runs on these defaults."
)


@dataclass(frozen=True)
class ServerConfig:
    host: str = setting(
        "127.0.0.1",
        "Address to listen on. 127.0.0.1 serves this machine only; 0.0.0.0 serves the LAN.",
        _not_empty)
    port: int = setting(8000, "TCP port of the API ({bounds}).", Between(1, 65535))
    allowed_hosts: str = setting(
        "",
        "Host names, besides the built-in ones, that requests may name in their Host header,"
        " separated by commas; \"*.example.com\" allows a domain's sub-names and \"*\" allows"
        " any name. Built in: localhost, any IP address, the host above and this machine's"
        " own name. Any other name is refused with 400, so that a web page whose domain an"
        " attacker points at this machine (DNS rebinding) cannot reach the API or the console"
        " from a LAN browser. Add the names clients use, e.g. \"images.example.com,"
        " gpu1.example.com\".",
        _host_names)
    max_connections: int = setting(
        4096,
        "Most client connections open at once ({bounds}). At the limit, a new connection"
        " closes the one that has waited longest without sending a complete request (idle"
        " between requests, or still sending its headers), so that a flood of idle"
        " connections cannot lock other clients out; only when every connection is busy with"
        " a request is a new one turned away. Lowered at startup, with a log line, to what the"
        " process's limit of open files allows.",
        Between(16, 1_000_000),
        heading="Connections. Slow or silent clients are disconnected, so that they cannot"
                " hold the service's connections or file descriptors.")
    header_timeout_seconds: float = setting(
        10.0,
        "Seconds a client has to send a request's headers ({bounds}), counted from the"
        " connection's opening (over HTTPS, the TLS handshake included) or from the first"
        " byte of a later request on it; a slower client is disconnected.",
        Between(0.5, 600.0))
    body_timeout_seconds: float = setting(
        60.0,
        "Seconds a client has to send a request's whole body once its headers are in"
        " ({bounds}); a slower client is disconnected. Raise it if clients send bodies near"
        " limits.max_request_bytes over slow links.",
        Between(1.0, 3600.0))
    send_timeout_seconds: float = setting(
        60.0,
        "Seconds a client may go without reading while an answer waits to be sent to it"
        " ({bounds}); a client that stops reading is disconnected.",
        Between(1.0, 3600.0))
    keep_alive_seconds: int = setting(
        5, "Seconds an idle connection is kept open for a client's next request ({bounds}).",
        Between(1, 600))
    tls_certificate: str = setting(
        "",
        "The server's certificate for HTTPS: a PEM file, with any intermediate certificates"
        " after it; relative to this file. With tls_key, the port serves HTTPS only (plain"
        " HTTP is not answered there); both empty serves plain HTTP. `install.sh --tls` makes"
        " a self-signed one and sets both.",
        heading="HTTPS. Without it, API keys, passwords and session cookies cross the network"
                " readable by anyone on the path.")
    tls_key: str = setting(
        "",
        "The certificate's private key: an unencrypted PEM file, relative to this file,"
        " which other users must not be able to read (mode 0600 or 0640); the service refuses"
        " to start with a key that any user can read.")

    def __post_init__(self) -> None:
        if bool(self.tls_certificate.strip()) != bool(self.tls_key.strip()):
            raise ConfigError("server.tls_certificate and server.tls_key must be set together"
                              " (both empty serves plain HTTP)")


@dataclass(frozen=True)
class StorageConfig:
    data_dir: Path = setting(Path("data"), "Folder for generated images and the service's secret.")
    database: Path | DatabaseUrl = setting(
        Path("data/appliance.db"),
        "The SQLite database file; or a PostgreSQL database's URL,"
        " postgresql://USER:PASSWORD@HOST:PORT/DBNAME, for cluster mode: every appliance"
        " pointed at the same database serves the same accounts, keys, credits and queue"
        " (README: Scaling out).")
    images_dir: str = setting(
        "",
        "Folder of the generated images; empty: \"images\" in data_dir. In cluster mode a"
        " folder every node mounts (NFS, CephFS), so that any node serves any image.")
    busy_timeout_seconds: float = setting(
        10.0,
        "Seconds a write waits for another writer (a backup, a CLI command) to finish"
        " ({bounds}). Past it, an API request is answered 503 with Retry-After and nothing"
        " of it is kept: no charge, no half-made job.",
        Between(0.0, 600.0))


@dataclass(frozen=True)
class ClusterConfig:
    node_name: str = setting(
        "",
        "This appliance's name among the nodes that share one PostgreSQL database"
        " (storage.database); empty: the machine's host name. Unique per node: a node that"
        " starts takes back the images it had claimed under its name.",
        heading="Cluster mode: only when storage.database is a postgresql:// URL (README:"
                " Scaling out).")
    lease_seconds: float = setting(
        30.0,
        "How long images a node has claimed stay its own without a heartbeat ({bounds}); the"
        " node renews them every quarter of it. Past it, another node makes them: a node that"
        " died delays its images by about this long.",
        Between(5.0, 3600.0))
    prefetch_images: int = setting(
        0,
        "Images a node claims ahead of its workers ({bounds}), so that its GPUs never wait for"
        " the database; 0: two batches per worker.",
        Between(0, 100_000))


@dataclass(frozen=True)
class ModelConfig:
    path: Path = setting(
        Path("models/demo"),
        "The default model's folder, a diffusers text-to-image pipeline (model_index.json"
        " inside), named by its folder. When the folder does not exist, the service creates"
        " the built-in tiny demo model there; its images are noise.")
    dir: str = setting(
        "",
        "Folder of installed models: each folder in it that holds a diffusers pipeline is a"
        " model, named by its folder, which a request may ask for by that name. Empty: the"
        " folder that holds model.path. Install one with `appliance models pull REPO_ID"
        " NAME`; a model added or removed is seen within seconds, without a restart.")
    default: str = setting(
        "",
        "The name of the model a request that names none gets; empty: the model in"
        " model.path.")
    lora_dir: str = setting(
        "",
        "Folder of LoRA adapters a request may apply (\"loras\": [{\"name\": ..., \"scale\":"
        " ...}]): each folder in it holds a diffusers LoRA file (*.safetensors) and a"
        " lora.json naming the models it fits, {\"base_models\": [\"NAME\", ...]}. Empty:"
        " \"loras\" beside the models folder.")
    device: str = setting("auto", "auto (CUDA when present, else CPU), cpu, cuda or cuda:N.",
                          check_device)
    dtype: str = setting(
        "auto", "auto (float16 on CUDA, float32 on CPU), float32, float16 or bfloat16.",
        _one_of("auto", "float32", "float16", "bfloat16"))


# Width and height share one comment in config.toml, as do each minimum and
# maximum below: a help text equal to the previous setting's is not repeated.
_SIZE_HELP = "Image width and height in pixels: {bounds}."
_SIZE_BOUNDS_HELP = "Smallest and largest width or height: {bounds}."
_STEPS_BOUNDS_HELP = "Fewest and most denoising steps ({bounds})."
_GUIDANCE_BOUNDS_HELP = "Lowest and highest guidance scale ({bounds})."


@dataclass(frozen=True)
class GenerationConfig:
    width: int = setting(512, _SIZE_HELP, _IMAGE_SIDE)
    height: int = setting(512, _SIZE_HELP, _IMAGE_SIDE)
    steps: int = setting(25, "Denoising steps per image ({bounds}).", Between(1, 200))
    guidance_scale: float = setting(
        7.5, "Classifier-free guidance scale ({bounds}; 1 or less turns guidance off).",
        Between(0.0, 30.0))
    min_size: int = setting(
        64, _SIZE_BOUNDS_HELP, _IMAGE_SIDE,
        heading="The settings above are the defaults; a request may ask for others within"
                " these bounds (a value outside them is refused with 400, never charged).")
    max_size: int = setting(1024, _SIZE_BOUNDS_HELP, _IMAGE_SIDE)
    min_steps: int = setting(1, _STEPS_BOUNDS_HELP, Between(1, 200))
    max_steps: int = setting(100, _STEPS_BOUNDS_HELP, Between(1, 200))
    min_guidance_scale: float = setting(0.0, _GUIDANCE_BOUNDS_HELP, Between(0.0, 30.0))
    max_guidance_scale: float = setting(20.0, _GUIDANCE_BOUNDS_HELP, Between(0.0, 30.0))

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
    max_prompts_per_request: int = setting(100, "Most prompts one request may carry ({bounds}).",
                                           Between(1, 10_000))
    max_prompt_length: int = setting(1000, "Longest prompt, in characters ({bounds}).",
                                     Between(1, 100_000))
    max_request_bytes: int = setting(
        1_048_576,
        "Largest request body in bytes ({bounds}); a larger one gets 413.",
        Between(1024, 1_073_741_824))
    max_pending_images_per_account: int = setting(
        500,
        "Most images one account may have waiting or generating at once ({bounds}); a"
        " request that would go past it gets 429 with Retry-After and is not charged.",
        Between(1, 10_000_000))
    requests_per_minute_per_key: int = setting(
        600,
        "Requests one API key may make per minute ({bounds}), in bursts of up to as many;"
        " past it requests get 429 with Retry-After. 0 turns the limit off.",
        Between(0, 1_000_000))


@dataclass(frozen=True)
class EngineConfig:
    queue_capacity: int = setting(
        1000, "Most images waiting in the queue ({bounds}); a request that would overflow it"
        " gets 503.",
        Between(1, 10_000_000))
    batch_size: int = setting(
        8,
        "Most images generated together in one pipeline call ({bounds}). Images of any jobs"
        " and accounts share a call when their settings (size, steps, guidance, negative"
        " prompt) are equal; accounts take turns, image by image, so one account's big job"
        " never holds back another's. Larger batches use a GPU better but need more GPU"
        " memory; lower it if batches run out of memory.",
        Between(1, 256))
    batch_window_seconds: float = setting(
        0.05,
        "Seconds a batch may wait for more images of the same settings to arrive"
        " ({bounds}), counted from when its oldest image was queued; a full batch starts at"
        " once.",
        Between(0.0, 10.0))
    devices: tuple[str, ...] | str = setting(
        (),
        "GPUs to run on, one worker (with its own copy of the model) each, all fed from one"
        " queue: a list such as [\"cuda:0\", \"cuda:1\"], or \"all\" for every CUDA GPU"
        " present. The empty list runs one worker on model.device. When this is set,"
        " model.device is not used; \"all\" on a machine without CUDA runs one CPU worker.",
        check_device_list)
    channels_last: bool = setting(
        True,
        "Keep the UNet and VAE in channels-last memory layout, which the fastest"
        " convolutions of cuDNN (GPU) and oneDNN (CPU) read. On the CPU only the UNet is"
        " converted: the VAE decoder was slower that way there.")
    compile: str = setting(
        "off",
        "Compile the UNet and the VAE decoder with torch.compile: off, default,"
        " reduce-overhead, max-autotune or max-autotune-no-cudagraphs (see PyTorch's"
        " torch.compile). Compiling can take minutes at startup and happens before the"
        " service reports ready: it is warmed up at the default size for each batch size in"
        " use (powers of two up to batch_size, and batch_size); batches are padded up to the"
        " next of these sizes so that no request waits for a compile. Other image sizes are"
        " compiled when first asked for.",
        _one_of("off", "default", "reduce-overhead", "max-autotune",
                "max-autotune-no-cudagraphs"))
    vae_decode_chunk: int = setting(
        8,
        "Most images the VAE decodes at once on a GPU ({bounds}; 0 decodes a whole batch"
        " together). Decoding takes much memory at large sizes: lower it if big batches run"
        " out of GPU memory. The CPU always decodes one image at a time, which keeps its work"
        " in the CPU's caches and was fastest there.",
        Between(0, 256))
    tiny_vae: str = setting(
        "",
        "A folder holding a diffusers AutoencoderTiny (for example a copy of"
        " madebyollin/taesd for SD 1.5) to decode images with instead of the model's own"
        " VAE: much faster, slightly less detailed. Relative to this file; empty uses the"
        " model's own VAE. It is never downloaded. It applies to every model but SDXL ones"
        " (their latents differ); [models.NAME] tiny_vae sets one model's.")
    gpu_memory_budget: str = setting(
        "90%",
        "Memory each worker's loaded models may take together: a share of its device's"
        " memory (\"90%\"; on the CPU, of the machine's) or an amount (\"20GiB\", \"500MB\")."
        " A worker keeps the models it has loaded while they fit and, to load another,"
        " unloads the one used least recently; a model larger than the whole budget is still"
        " loaded, alone.",
        _memory_amount)
    model_swap_seconds: float = setting(
        30.0,
        "A worker serves the models it has loaded first, while images for other models wait"
        " at most this many seconds ({bounds}); then it loads the model of the image that has"
        " waited longest. 0 serves images strictly in turn, loading models as they come.",
        Between(0.0, 3600.0))
    png_compress_level: int = setting(
        1,
        "PNG compression level ({bounds}): 0 is none, 9 gives the smallest files. PNGs are"
        " lossless at every level; 1 encodes a 512x512 photo about 2.5 times faster than 6"
        " for files about 10% larger.",
        Between(0, 9))
    png_threads: int = setting(
        0,
        "Threads that encode and write the PNGs beside the GPU ({bounds}); 0 uses half"
        " the CPU cores, from 1 to 8.",
        Between(0, 64))


@dataclass(frozen=True)
class OpenAIConfig:
    wait_timeout: float = setting(
        300.0,
        "Seconds POST /v1/images/generations waits for its images ({bounds}). When"
        " they are not ready by then it answers 504, cancels the images not yet started and"
        " refunds them; images already made stay in the job.",
        Between(1.0, 86_400.0))


@dataclass(frozen=True)
class ConsoleConfig:
    idle_timeout_minutes: int = setting(
        60, "Minutes without a request after which a console sign-in ends ({bounds}).",
        Between(1, 10_080))
    absolute_timeout_hours: int = setting(
        12, "Hours after which a console sign-in ends however active it is ({bounds}).",
        Between(1, 720))
    signin_window_minutes: int = setting(
        60,
        "Failed sign-ins are forgotten when this many minutes ({bounds}) pass without another"
        " one, counted from the end of the wait the last one imposed.",
        Between(1, 1440))
    max_failed_signins_per_account_and_address: int = setting(
        5,
        "Failed sign-ins to one account from one client address ({bounds}) before each"
        " further one makes the next attempt from there wait: 1 second, then twice as long"
        " after each further failure, up to console.signin_max_wait_seconds. A successful"
        " sign-in from that address, or an administrator's unlock, clears the count; failures"
        " from other addresses never hold this address back.",
        Between(1, 1000))
    max_failed_signins_per_address: int = setting(
        20,
        "Failed sign-ins from one client address, whatever the accounts ({bounds}), before"
        " its attempts wait in the same way.",
        Between(1, 100_000))
    signin_max_wait_seconds: int = setting(
        900, "The longest of those waits, in seconds ({bounds}).", Between(1, 86_400))
    max_failed_signins_per_account: int = setting(
        50,
        "Failed sign-ins to one account from all addresses together ({bounds}; many"
        " addresses guessing at once) before every attempt to it waits"
        " console.signin_account_wait_seconds after its latest failure, except from the"
        " addresses it has signed in from before. An administrator's unlock clears the"
        " count.",
        Between(1, 100_000))
    signin_account_wait_seconds: int = setting(
        5,
        "That wait, in seconds ({bounds}). Keep it short: strangers can make the owner, at"
        " an address new to the account, wait it too.",
        Between(1, 60))
    secure_cookies: bool = setting(
        False,
        "Mark the console's cookies Secure even on plain HTTP requests. Requests that arrive"
        " over HTTPS (or through a proxy on this machine that says X-Forwarded-Proto: https)"
        " get Secure cookies anyway; set this when a TLS proxy elsewhere does not say so.")


@dataclass(frozen=True)
class HousekeepingConfig:
    audit_retention_days: int = setting(
        90, "Audit rows older than this many days are deleted ({bounds}).",
        Between(1, 36_500),
        heading="The scheduler runs these clean-ups at startup and then daily.")
    image_retention_days: int = setting(
        0,
        "Finished jobs older than this many days ({bounds}) are deleted with their images"
        " (rows and PNG files); the credit ledger keeps its rows. 0 keeps them forever.",
        Between(0, 36_500))


@dataclass(frozen=True)
class HealthConfig:
    worker_stall_seconds: int = setting(
        600,
        "Seconds the engine worker may spend on one batch before it counts as hung"
        " ({bounds}); keep it above the longest batch your GPU takes plus"
        " engine.batch_window_seconds (a value not above that window is refused). A hung"
        " worker fails /readyz and, under systemd, stops feeding the watchdog, so systemd"
        " restarts the service.",
        Between(1, 86_400))
    min_free_disk_mb: int = setting(
        200,
        "MiB that must stay free on the disk of the data folder and of the database"
        " ({bounds}; 0 turns the check off). Below it /readyz fails, so that a balancer"
        " sends work elsewhere before jobs and images can no longer be saved, and"
        " `appliance doctor` reports a problem.",
        Between(0, 1_000_000))


@dataclass(frozen=True)
class LoggingConfig:
    format: str = setting(
        "logfmt",
        "logfmt (key=value pairs, one record a line: easy to read in the journal) or json"
        " (one JSON object a line, for log collectors). API keys, passwords and session ids"
        " are never written.",
        _one_of("logfmt", "json"))
    level: str = setting("info", "debug, info, warning or error.",
                         _one_of("debug", "info", "warning", "error"))
    access_log: bool = setting(
        True,
        "Write a line for every HTTP request (method, path, status, client). At hundreds of"
        " requests a second (clients polling their jobs) it is about a tenth of a status poll's"
        " server time, and journald's default rate limit (10,000 lines in 30 s for a"
        " service) then drops lines, warnings and errors among them: behind a proxy that"
        " logs requests, or with many polling clients, set false. /metrics counts every"
        " request by route and status either way.")


# [models.NAME]: one installed model's own settings, where it needs them. Each key
# is optional; a missing one takes the value below it in this order: the model's
# table, the model's kind (an SDXL pipeline makes 1024x1024 images), [generation]
# and model.dtype.
MODEL_SETTING_CHECKS: dict[str, tuple[type, Check]] = {
    "width": (int, _IMAGE_SIDE),
    "height": (int, _IMAGE_SIDE),
    "steps": (int, Between(1, 200)),
    "guidance_scale": (float, Between(0.0, 30.0)),
    "dtype": (str, _one_of("auto", "float32", "float16", "bfloat16")),
    "credits_per_image": (int, Between(1, 1_000_000)),
    "tiny_vae": (str, lambda value: None),
}
MODEL_SETTINGS_HELP = (
    "[models.NAME] tables hold one installed model's own settings, where it needs them:"
    " its default width, height, steps and guidance_scale (within [generation]'s bounds),"
    " its dtype, credits_per_image"
    f" ({MODEL_SETTING_CHECKS['credits_per_image'][1]}, default 1: what each of its images"
    " costs) and tiny_vae (a folder as engine.tiny_vae; \"\" for none). A missing key takes"
    " [generation]'s value (an SDXL model's size defaults to 1024x1024), model.dtype, or"
    " engine.tiny_vae, which an SDXL model never takes: its latents need a tiny VAE made for"
    " SDXL. For example:")
MODEL_SETTINGS_EXAMPLE = """[models.sdxl-base]
width = 1024
height = 1024
steps = 30
credits_per_image = 4"""


@dataclass(frozen=True)
class ModelSettings:
    """One [models.NAME] table; None: not set there."""

    width: int | None = None
    height: int | None = None
    steps: int | None = None
    guidance_scale: float | None = None
    dtype: str | None = None
    credits_per_image: int = 1
    tiny_vae: str | None = None


def _model_settings(raw: Any) -> dict[str, ModelSettings]:
    if not isinstance(raw, dict):
        raise ConfigError("models must be tables ([models.NAME])")
    tables = {}
    for name, values in raw.items():
        if not isinstance(values, dict):
            raise ConfigError(f"models.{name} must be a table ([models.{name}])")
        unknown = sorted(set(values) - set(MODEL_SETTING_CHECKS))
        if unknown:
            raise ConfigError(f"unknown key models.{name}.{unknown[0]}")
        kwargs = {}
        for key, value in values.items():
            kind, check = MODEL_SETTING_CHECKS[key]
            value = _coerce(f"models.{name}.{key}", value, kind())
            problem = check(value)
            if problem:
                raise ConfigError(f"models.{name}.{key} {problem}")
            kwargs[key] = value
        tables[name] = ModelSettings(**kwargs)
    return tables


@dataclass(frozen=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    openai: OpenAIConfig = field(default_factory=OpenAIConfig)
    console: ConsoleConfig = field(default_factory=ConsoleConfig)
    housekeeping: HousekeepingConfig = field(default_factory=HousekeepingConfig)
    health: HealthConfig = field(default_factory=HealthConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    # [models.NAME] tables, by name.
    models: dict[str, ModelSettings] = field(default_factory=dict)
    # The file the settings came from (None: embedded defaults); relative
    # paths in it were resolved against its folder.
    source: Path | None = None

    @property
    def images_dir(self) -> Path:
        return (self.resolve(self.storage.images_dir) if self.storage.images_dir
                else self.storage.data_dir / "images")

    @property
    def cluster_mode(self) -> bool:
        """Whether the data is in PostgreSQL, shared with other nodes."""
        return isinstance(self.storage.database, DatabaseUrl)

    @property
    def node_name(self) -> str:
        return self.cluster.node_name or socket.gethostname()

    @property
    def secret_file(self) -> Path:
        return self.storage.data_dir / "secret_key"

    @property
    def models_dir(self) -> Path:
        """model.dir, or the folder that holds model.path (so an install made before
        model.dir existed finds the models beside its default one)."""
        return self.resolve(self.model.dir) if self.model.dir else self.model.path.parent

    @property
    def loras_dir(self) -> Path:
        """model.lora_dir, or "loras" beside the models folder."""
        return (self.resolve(self.model.lora_dir) if self.model.lora_dir
                else self.models_dir.parent / "loras")

    def resolve(self, text: str) -> Path:
        """A path from a string setting (engine.tiny_vae, where empty means none),
        relative to the config file's folder as the path settings are."""
        path = Path(text).expanduser()
        if path.is_absolute():
            return path
        return (self.source.parent if self.source else Path.cwd()) / path


# In config.toml's order.
SECTIONS: dict[str, type] = {
    f.name: f.default_factory  # type: ignore[misc]
    for f in dataclasses.fields(Config)
    if f.name not in ("source", "models")
}

# A field declared without setting() has no help, which a test reports.
SETTINGS: tuple[Setting, ...] = tuple(
    Setting(section, f.name, f.default, f.metadata.get("help", ""), f.metadata.get("check"),
            f.metadata.get("heading", ""))
    for section, cls in SECTIONS.items()
    for f in dataclasses.fields(cls)
)

_BY_KEY: dict[str, Setting] = {s.key: s for s in SETTINGS}


# The folder above the package: a checkout when the code runs from one (the editable
# install `install.sh --dev` makes), site-packages when it was installed as a copy.
CHECKOUT = Path(__file__).resolve().parents[2]


def checkout_config_file() -> Path | None:
    """The config.toml of the checkout this code runs from, if it runs from one.

    So that a checkout's `.venv/bin/appliance` means the checkout's service from any
    folder; an installed copy finds none here (the installer's wrapper names its config).
    """
    if (CHECKOUT / "pyproject.toml").is_file() and (CHECKOUT / "config.toml").is_file():
        return CHECKOUT / "config.toml"
    return None


def find_config_file(explicit: str | os.PathLike[str] | None) -> tuple[Path, bool]:
    """Returns (path, must_exist): --config, else $APPLIANCE_CONFIG, else ./config.toml,
    else the config of the checkout this code runs from."""
    if explicit:
        return Path(explicit), True
    if os.environ.get(CONFIG_ENV):
        return Path(os.environ[CONFIG_ENV]), True
    here = Path("config.toml")
    checkout = None if here.exists() else checkout_config_file()
    if checkout is not None:
        return checkout, True
    return here, False


def read_config_file(explicit: str | os.PathLike[str] | None = None
                     ) -> tuple[dict[str, Any], Path, Path | None]:
    """The config file's tables, the folder its relative paths start from, and the file
    (None: there is none, and the defaults apply)."""
    path, must_exist = find_config_file(explicit)
    if not path.exists():
        if must_exist:
            raise ConfigError(f"config file {path} does not exist")
        return {}, Path.cwd(), None
    try:
        with path.open("rb") as fh:
            raw = tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot be read: {exc.strerror}") from None
    return raw, path.resolve().parent, path.resolve()


def load_config(explicit: str | os.PathLike[str] | None = None) -> Config:
    raw, base_dir, source = read_config_file(explicit)
    try:
        return config_from_dict(raw, base_dir=base_dir, source=source)
    except ConfigError as exc:
        # Named as the operator gave it (or as found), not resolved.
        raise ConfigError(f"{find_config_file(explicit)[0]}: {exc}") from None


def config_from_dict(raw: dict[str, Any], base_dir: Path, source: Path | None = None) -> Config:
    unknown = sorted(set(raw) - set(SECTIONS) - {"models"})
    if unknown:
        raise ConfigError(f"unknown section [{unknown[0]}]")
    sections: dict[str, Any] = {"models": _model_settings(raw.get("models", {}))}
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
    generation = config.generation
    bounds = {"width": (generation.min_size, generation.max_size),
              "height": (generation.min_size, generation.max_size),
              "steps": (generation.min_steps, generation.max_steps),
              "guidance_scale": (generation.min_guidance_scale, generation.max_guidance_scale)}
    for name, table in config.models.items():
        for key, (low, high) in bounds.items():
            value = getattr(table, key)
            if value is not None and not low <= value <= high:
                raise ConfigError(f"models.{name}.{key} is {value}, outside [generation]'s"
                                  f" bounds for requests ({low} to {high})")


def _build_section(section: str, cls: type, values: dict[str, Any], base_dir: Path) -> Any:
    declared = {s.name: s for s in SETTINGS if s.section == section}
    unknown = sorted(set(values) - set(declared))
    if unknown:
        raise ConfigError(f"unknown key {section}.{unknown[0]}")
    kwargs = {}
    for name, s in declared.items():
        value = _coerce(s.key, values[name], s.default) if name in values else s.default
        if isinstance(value, Path) and not value.is_absolute():
            value = base_dir / value
        problem = s.check(value) if s.check else None
        if problem:
            raise ConfigError(f"{s.key} {problem}")
        kwargs[name] = value
    return cls(**kwargs)


_TYPE_WORDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _coerce(key: str, value: Any, default: Any) -> Any:
    expected = type(default)
    if isinstance(default, Path):
        if isinstance(value, str) and looks_like_url(value):
            # Never shown: a database URL may carry a password.
            if key in _URL_ALLOWED:
                try:
                    return DatabaseUrl(value.strip())
                except ValueError as exc:
                    raise ConfigError(f"{key} {exc}") from None
            raise ConfigError(f"{key} must be a path on this machine, not a"
                              f" {scheme_of(value)}:// URL (models are read from folders)")
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


# Settings that may name a server instead of a path: the database (cluster mode).
_URL_ALLOWED = {"storage.database"}


def _describe(value: Any) -> str:
    kinds = {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
             list: "an array", dict: "a table"}
    return f"{kinds.get(type(value), type(value).__name__)} ({value!r})"


_INTEGER = re.compile(r"[+-]?[0-9]+")
_NUMBER = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?")


def declared(key: str) -> Setting:
    """The setting named "section.name"; KeyError for an unknown one."""
    return _BY_KEY[key]


def parse_assignment(text: str) -> tuple[str, str, Any]:
    """One "section.key=value", typed by the setting: "engine.batch_size=16" gives
    ("engine", "batch_size", 16).

    The value comes back as a TOML file would give it (a path as a string, a
    list as a list, or "all" as a word), for config_from_dict to check against
    the setting's bounds. A list is written as names separated by commas.
    """
    key, equals, value = text.partition("=")
    if not equals:
        raise ConfigError(f"{text!r} must be section.key=value")
    section, _, name = key.strip().partition(".")
    if section not in SECTIONS:
        raise ConfigError(f"unknown section [{section}] in {text!r}")
    declared = _BY_KEY.get(f"{section}.{name}")
    if declared is None:
        raise ConfigError(f"unknown key {section}.{name} in {text!r}")
    return section, name, _parse_value(declared, value.strip())


def _parse_value(declared: Setting, text: str) -> Any:
    default = declared.default
    if isinstance(default, bool):
        if text not in ("true", "false"):
            raise ConfigError(f"{declared.key} must be true or false, got {text!r}")
        return text == "true"
    if isinstance(default, int):
        if not _INTEGER.fullmatch(text):
            raise ConfigError(f"{declared.key} must be an integer, got {text!r}")
        # Bounded before the setting's own check: int() of thousands of digits is
        # slow, and past 4300 it raises.
        try:
            return whole_number(text.removeprefix("+"), -LARGEST_INTEGER - 1, LARGEST_INTEGER)
        except ValueError as problem:
            raise ConfigError(f"{declared.key}: {problem}") from None
    if isinstance(default, float):
        if not _NUMBER.fullmatch(text):
            raise ConfigError(f"{declared.key} must be a number, got {text!r}")
        return float(text)
    if isinstance(default, Path):
        if not text:
            raise ConfigError(f"{declared.key} must be a path, got nothing")
        return text
    if isinstance(default, tuple):
        if text == ALL:
            return text
        names = [part.strip() for part in text.split(",")] if text else []
        if "" in names:
            raise ConfigError(f"{declared.key} must be names separated by commas, got {text!r}")
        return names
    return text


def apply_assignments(raw: dict[str, Any], texts: list[str]) -> dict[str, Any]:
    """A copy of `raw` (a config file's tables) with each "section.key=value" applied."""
    result = {name: dict(values) if isinstance(values, dict) else values
              for name, values in raw.items()}
    for text in texts:
        section, name, value = parse_assignment(text)
        values = result.setdefault(section, {})
        if not isinstance(values, dict):
            raise ConfigError(f"{section} must be a table ([{section}])")
        values[name] = value
    return result


def render_config_toml() -> str:
    """config.toml as shipped: every setting at its default, under its help text."""
    lines = _comment(_HEADER)
    section = ""
    previous_help = ""
    for s in SETTINGS:
        if s.section != section:
            lines += ["", f"[{s.section}]"]
            section, previous_help = s.section, ""
        if s.heading:
            lines += _comment(s.heading)
        if s.heading or s.help != previous_help:
            lines += _comment(s.help)
        previous_help = s.help
        lines.append(f"{s.name} = {_toml_value(s.default)}")
    lines += ["", *_comment(MODEL_SETTINGS_HELP), "#"]
    lines += [f"# {line}" for line in MODEL_SETTINGS_EXAMPLE.splitlines()]
    return "\n".join(lines) + "\n"


def _comment(text: str) -> list[str]:
    lines: list[str] = []
    for paragraph in text.split("\n\n"):
        if lines:
            lines.append("#")
        # A command in backticks stays on one line, to be copied whole: its spaces
        # become NULs, which textwrap does not break at, until it is wrapped.
        unbroken = re.sub(r"`[^`]*`", lambda code: code[0].replace(" ", "\0"), paragraph)
        wrapped = textwrap.wrap(unbroken, width=80, initial_indent="# ", subsequent_indent="# ",
                                break_long_words=False, break_on_hyphens=False)
        lines += [line.replace("\0", " ") for line in wrapped]
    return lines


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, Path):
        return json.dumps(value.as_posix())
    if isinstance(value, str):
        # A JSON string of ASCII is a TOML basic string.
        return json.dumps(value)
    return "[" + ", ".join(json.dumps(item) for item in value) + "]"


if __name__ == "__main__":
    sys.stdout.write(render_config_toml())
