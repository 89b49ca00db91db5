"""The LoRA adapters loaded into one pipeline, and which of them are active.

An adapter is read from disk and patched into the pipeline's layers the first
time a request asks for it; after that, switching adapters on and off or
changing their scales costs no loading. This uses diffusers' LoRA support,
whose PEFT backend keeps every loaded adapter beside the base weights.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


def _not_about_text_encoders(record: logging.LogRecord) -> bool:
    # An adapter for the UNet alone, as most are, is loaded into an SDXL pipeline with a
    # warning for each of its text encoders that the adapter has nothing for it.
    return not record.getMessage().startswith("No LoRA keys associated to")


logging.getLogger("diffusers.loaders.lora_base").addFilter(_not_about_text_encoders)
# peft says so for every adapter after the first one in a model: that is the point here.
warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")

# (name, scale) pairs, sorted by name; () is the base model alone.
Loras = tuple[tuple[str, float], ...]

# Some reasons run to a line per layer (a LoRA made for another architecture
# lists every mismatched shape); the first lines say what is wrong.
REASON_LINES = 2


class AdapterLoadError(RuntimeError):
    pass


class Adapters:
    def __init__(self, pipe: Any, path_of: Callable[[str], Path]):
        """`pipe`: a diffusers pipeline with LoRA support; `path_of(name)`: the adapter's
        .safetensors file."""
        self._pipe = pipe
        self._path_of = path_of
        self._loaded: set[str] = set()
        # What the pipeline was last set to; None until the first call and after
        # a failed one, when the pipeline's state is not known.
        self._active: Loras | None = None

    @property
    def loaded(self) -> frozenset[str]:
        return frozenset(self._loaded)

    def apply(self, loras: Loras) -> None:
        """Make exactly these adapters active at these scales; load those not loaded yet."""
        if loras == self._active:
            return
        self._active = None
        for name, _scale in loras:
            if name not in self._loaded:
                self._load(name)
        if loras:
            # disable_lora() switches every adapter off until enable_lora().
            self._pipe.enable_lora()
            self._pipe.set_adapters([name for name, _scale in loras],
                                    adapter_weights=[scale for _name, scale in loras])
        elif self._loaded:
            self._pipe.disable_lora()
        self._active = loras

    def _load(self, name: str) -> None:
        try:
            path = Path(self._path_of(name))
            if not path.is_file():
                # diffusers would take a missing folder for a Hub repository's name.
                raise FileNotFoundError(f"{path} does not exist")
            self._pipe.load_lora_weights(path.parent, weight_name=path.name, adapter_name=name,
                                         local_files_only=True)
        except Exception as error:
            # diffusers and safetensors raise many types for files that are not LoRAs.
            self._forget(name)
            raise AdapterLoadError(
                f"Could not load the LoRA adapter {name!r}: {_reason(error)}") from error
        if name not in self._present():
            raise AdapterLoadError(f"Could not load the LoRA adapter {name!r}: it has no "
                                   f"weights for any layer of this {type(self._pipe).__name__}")
        self._loaded.add(name)
        logger.info("Loaded the LoRA adapter %s from %s", name, path)

    def _present(self) -> set[str]:
        """The adapters the pipeline's layers hold."""
        listed = self._pipe.get_list_adapters()
        return {name for names in listed.values() for name in names}

    def _forget(self, name: str) -> None:
        # A load that failed halfway may have patched some layers already.
        if name in self._present():
            self._pipe.delete_adapters(name)


def _reason(error: Exception) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return " ".join(lines[:REASON_LINES]) or type(error).__name__
