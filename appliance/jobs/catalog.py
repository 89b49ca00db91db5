"""The installed models and LoRA adapters: what a request may name, and at what price.

A model is a folder holding a diffusers pipeline (model_index.json) in
model.dir, named by its folder, or the folder model.path names. A LoRA adapter
is a folder in model.lora_dir with a diffusers LoRA file (*.safetensors) and a
lora.json naming the models it fits. Both folders are read again at most every
RESCAN_SECONDS, so that a model pulled or removed is seen without a restart.

A model whose folder the engine failed to load is marked broken here: requests
for it are refused (400, uncharged) until its folder changes.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance.core.config import Config
from appliance.core.errors import BadRequest

log = logging.getLogger(__name__)

RESCAN_SECONDS = 2.0
# A name a request may use for a model or an adapter: a folder's name, without
# anything a path or a shell would read otherwise.
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
LORA_DECLARATION = "lora.json"
# SDXL pipelines are trained at 1024x1024; their images at SD 1.5's 512 are poor.
SDXL_SIZE = 1024


@dataclass(frozen=True)
class ModelDefaults:
    """What a request for the model gets where it names no value."""

    width: int
    height: int
    steps: int
    guidance_scale: float


@dataclass(frozen=True)
class InstalledModel:
    name: str
    path: Path
    pipeline: str  # model_index.json's _class_name; "" until the demo model is made
    defaults: ModelDefaults
    dtype: str
    credits_per_image: int
    created: int  # Unix time its folder was installed (model_index.json's mtime)
    # The tiny VAE folder it decodes with ("": its own VAE), as config.resolve takes it.
    tiny_vae: str = ""
    # Why requests for it are refused; None when it can be served.
    problem: str | None = None


@dataclass(frozen=True)
class InstalledLora:
    name: str
    path: Path  # its *.safetensors file
    base_models: tuple[str, ...]


class UnknownModel(BadRequest):
    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


class Catalog:
    def __init__(self, config: Config, clock=time.monotonic):
        self.config = config
        self._clock = clock
        self._lock = threading.Lock()
        self._scanned_at = float("-inf")
        self._models: dict[str, InstalledModel] = {}
        self._loras: dict[str, InstalledLora] = {}
        # name -> (the folder's signature when it failed, the error)
        self._broken: dict[str, tuple[float, str]] = {}
        self._warned: set[str] = set()

    @property
    def default_name(self) -> str:
        return self.config.model.default or self.config.model.path.name

    def models(self) -> list[InstalledModel]:
        """Every installed model, by name; broken ones carry their problem."""
        self._rescan()
        return sorted(self._models.values(), key=lambda model: model.name)

    def loras(self) -> list[InstalledLora]:
        self._rescan()
        return sorted(self._loras.values(), key=lambda lora: lora.name)

    def installed_text(self) -> str:
        """The installed models' names, as messages list them."""
        self._rescan()
        return ", ".join(sorted(self._models)) or "none"

    def model(self, name: str | None, field: str = "model") -> InstalledModel:
        """The model a request names (None: the default one), or 400 naming those there are."""
        self._rescan()
        wanted = self.default_name if name is None else name
        model = self._models.get(wanted)
        if model is None:
            raise UnknownModel(field, f"'{field}' is {wanted!r}, which is not installed here;"
                               f" installed: {self.installed_text()} (see GET /api/models)")
        if model.problem:
            raise UnknownModel(field, f"'{field}' is {wanted!r}, which cannot be served:"
                               f" {model.problem}")
        return model

    def served(self, name: str) -> InstalledModel:
        """The model, for the engine to load; LookupError saying why it cannot be."""
        self._rescan()
        model = self._models.get(name)
        if model is None:
            raise LookupError("it is not installed")
        if model.problem:
            raise LookupError(model.problem)
        return model

    def lora(self, name: str, model: InstalledModel, field: str) -> InstalledLora:
        """The adapter a request names, if it fits `model`; else 400."""
        self._rescan()
        lora = self._loras.get(name)
        if lora is None:
            installed = ", ".join(sorted(self._loras)) or "none"
            raise BadRequest(f"'{field}' is {name!r}, which is not installed here;"
                             f" installed: {installed}")
        if model.name not in lora.base_models:
            raise BadRequest(f"'{field}' is {name!r}, which fits {', '.join(lora.base_models)},"
                             f" not the model {model.name!r}")
        return lora

    def lora_path(self, name: str) -> Path:
        """The adapter's file, for the engine (which loads adapters a request was allowed)."""
        self._rescan()
        lora = self._loras.get(name)
        if lora is None:
            raise FileNotFoundError(f"the LoRA adapter {name!r} is no longer installed")
        return lora.path

    def path_of(self, name: str) -> Path:
        """The model's folder, for the engine; KeyError for one no longer installed."""
        self._rescan()
        return self._models[name].path

    def mark_broken(self, name: str, problem: str) -> None:
        """The engine could not load the model: refuse it until its folder changes."""
        self._rescan()
        with self._lock:
            path = self._models[name].path if name in self._models else None
            self._broken[name] = (_signature(path) if path else 0.0, problem)
            self._scanned_at = float("-inf")

    def rescan(self) -> None:
        """Reads both folders now (after `appliance models pull` in this process)."""
        with self._lock:
            self._scanned_at = float("-inf")
        self._rescan()

    def _rescan(self) -> None:
        with self._lock:
            now = self._clock()
            if now - self._scanned_at < RESCAN_SECONDS:
                return
            self._scanned_at = now
            self._models = self._scan_models()
            self._loras = self._scan_loras()

    def _scan_models(self) -> dict[str, InstalledModel]:
        folders: dict[str, Path] = {}
        model_dir = self.config.models_dir
        if model_dir.is_dir():
            for folder in sorted(model_dir.iterdir()):
                if NAME.fullmatch(folder.name) and (folder / "model_index.json").is_file():
                    folders[folder.name] = folder
        # model.path is served even outside model.dir, and before the demo exists.
        folders[self.config.model.path.name] = self.config.model.path
        return {name: self._describe(name, folder) for name, folder in folders.items()}

    def _describe(self, name: str, folder: Path) -> InstalledModel:
        index_file = folder / "model_index.json"
        pipeline, problem, created = "", None, 0
        if index_file.is_file():
            try:
                index: Any = json.loads(index_file.read_text(encoding="utf-8"))
                pipeline = str(index.get("_class_name", ""))
                created = int(index_file.stat().st_mtime)
            except (OSError, ValueError, AttributeError) as error:
                problem = f"its model_index.json cannot be read ({error})"
        broken = self._broken.get(name)
        if broken is not None:
            signature, reason = broken
            if signature == _signature(folder):
                problem = reason
            else:
                del self._broken[name]  # changed since: worth another try
        table = self.config.models.get(name)
        generation = self.config.generation
        native = SDXL_SIZE if "XL" in pipeline else None

        def pick(key: str, fallback: Any) -> Any:
            value = getattr(table, key) if table else None
            return fallback if value is None else value

        defaults = ModelDefaults(
            width=pick("width", native or generation.width),
            height=pick("height", native or generation.height),
            steps=pick("steps", generation.steps),
            guidance_scale=pick("guidance_scale", generation.guidance_scale))
        # engine.tiny_vae is made for SD 1.x/2.x latents: SDXL's need a tiny VAE of their own.
        tiny_vae = pick("tiny_vae", "" if native else self.config.engine.tiny_vae)
        return InstalledModel(name=name, path=folder, pipeline=pipeline, defaults=defaults,
                              dtype=pick("dtype", self.config.model.dtype),
                              credits_per_image=table.credits_per_image if table else 1,
                              created=created, problem=problem, tiny_vae=tiny_vae)

    def _scan_loras(self) -> dict[str, InstalledLora]:
        loras: dict[str, InstalledLora] = {}
        lora_dir = self.config.loras_dir
        if not lora_dir.is_dir():
            return loras
        for folder in sorted(lora_dir.iterdir()):
            declaration = folder / LORA_DECLARATION
            if not NAME.fullmatch(folder.name) or not declaration.is_file():
                continue
            try:
                bases = json.loads(declaration.read_text(encoding="utf-8"))["base_models"]
                weights = sorted(folder.glob("*.safetensors"))
                if (not isinstance(bases, list) or not bases
                        or not all(isinstance(base, str) for base in bases)):
                    raise ValueError("base_models must be a list of model names")
                if len(weights) != 1:
                    raise ValueError(f"it must hold one *.safetensors file, not {len(weights)}")
            except (OSError, ValueError, KeyError, TypeError) as error:
                problem = f"skipped the LoRA adapter in {folder}: {error}"
                if problem not in self._warned:  # once, not at every rescan
                    self._warned.add(problem)
                    log.warning("%s", problem)
                continue
            loras[folder.name] = InstalledLora(folder.name, weights[0], tuple(bases))
        return loras


def _signature(folder: Path) -> float:
    """Changes when the folder's model is replaced: the newest mtime of its index and parts."""
    try:
        return max([(folder / "model_index.json").stat().st_mtime]
                   + [part.stat().st_mtime for part in folder.iterdir()])
    except OSError:
        return 0.0
