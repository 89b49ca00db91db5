"""The models one worker holds on its device, within a memory budget.

A worker keeps every model it has loaded while they fit in its budget
(engine.gpu_memory_budget); to load another it first unloads those used least
recently until the new one fits, so a model larger than the whole budget is
loaded alone. Only the worker's thread calls get(); the system page and
/metrics read `names` and `sizes` from other threads.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from appliance.core.numbers import size_text

log = logging.getLogger(__name__)


class Generator(Protocol):
    """What the worker calls on a model's generator (engine/worker.py ImageGenerator)."""

    def generate(self, prompts, seeds, settings): ...


def memory_of(generator: object) -> int:
    """Bytes the generator's model takes on its device (0 for stand-ins without weights)."""
    measure = getattr(generator, "memory_bytes", None)
    return int(measure()) if callable(measure) else 0


class LoadedModels:
    def __init__(self, load: Callable[[str], Generator], budget: Callable[[], int], device: str,
                 estimate: Callable[[str], int] = lambda name: 0,
                 release: Callable[[], None] | None = None):
        """`load(name)` makes a model's generator; `estimate(name)`, the bytes it will take
        (its weights on disk), so that room is made before it loads rather than after;
        `release` frees what unloaded models held, once their entries are gone
        (gpu.release_unloaded_models)."""
        self._load = load
        self._budget = budget
        # Worked out on the worker's thread at its first load (on a GPU it asks CUDA).
        self.budget_bytes: int | None = None
        self._estimate = estimate
        # Measured sizes of models loaded before: better than the estimate.
        self._measured: dict[str, int] = {}
        self.device = device
        self._release = release
        # name -> (generator, bytes), least recently used first
        self._models: OrderedDict[str, tuple[Generator, int]] = OrderedDict()
        self._lock = threading.Lock()
        self.loads = 0
        self.unloads = 0
        self.load_seconds = 0.0  # all loads together
        # When the latest load ended (time.monotonic): the queue lets a model keep
        # the worker a while after it was loaded.
        self.loaded_at = float("-inf")

    @property
    def names(self) -> frozenset[str]:
        with self._lock:
            return frozenset(self._models)

    def sizes(self) -> dict[str, int]:
        """Bytes each loaded model takes, least recently used first."""
        with self._lock:
            return {name: size for name, (_, size) in self._models.items()}

    def get(self, name: str) -> Generator:
        """The model's generator, loading it (and unloading others to make room) first."""
        with self._lock:
            if name in self._models:
                self._models.move_to_end(name)
                return self._models[name][0]
        started = time.perf_counter()
        if self.budget_bytes is None:
            self.budget_bytes = self._budget()
        expected = self._measured.get(name)
        evicted = self._make_room(self._estimate(name) if expected is None else expected)
        generator = self._load(name)
        size = self._measured[name] = memory_of(generator)
        # The estimate may have been short: the others make room for what it takes.
        evicted += self._make_room(size)
        with self._lock:
            self._models[name] = (generator, size)
        self.loads += 1
        self.loaded_at = time.monotonic()
        seconds = time.perf_counter() - started
        self.load_seconds += seconds
        log.info("loaded the model %s on %s in %.1f s (%s; budget %s)%s", name,
                 self.device, seconds, size_text(size), size_text(self.budget_bytes or 0),
                 f"; unloaded {', '.join(evicted)} to make room" if evicted else "",
                 extra={"event": "model.loaded", "model": name, "seconds": round(seconds, 3),
                        "unloaded": evicted})
        return generator

    def _make_room(self, size: int) -> list[str]:
        """Unloads the least recently used models until `size` more bytes fit the budget."""
        evicted = []
        budget = self.budget_bytes or 0
        with self._lock:
            while self._models and sum(s for _, s in self._models.values()) + size > budget:
                name, _ = self._models.popitem(last=False)
                evicted.append(name)
        if evicted:
            self.unloads += len(evicted)
            if self._release is not None:
                self._release()
        return evicted


# Weight files diffusers loads, and the half-precision variants it prefers when present.
_WEIGHTS = ("*.safetensors", "*.bin")
_HALF_VARIANT = ".fp16."
_BYTES_PER_VALUE = {"float32": 4, "float16": 2, "bfloat16": 2}


def weights_on_disk(folder: Path, dtype: str) -> int:
    """About the bytes the model's weights take once loaded as `dtype` ("auto": as
    stored): what its files hold, rescaled from the precision they are stored in."""
    files = [path for pattern in _WEIGHTS for path in folder.glob(f"*/{pattern}")]
    half = [path for path in files if _HALF_VARIANT in path.name]
    stored_bytes, chosen = (2, half) if half else (4, files)
    total = sum(path.stat().st_size for path in chosen if path.is_file())
    wanted = _BYTES_PER_VALUE.get(dtype, stored_bytes)
    return total * wanted // stored_bytes
