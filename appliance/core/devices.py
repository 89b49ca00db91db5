"""What a device name is: the one definition the config, engine, doctor and benchmark share.

A device (model.device, a command's --device) is `auto`, `cpu`, `cuda` or `cuda:N`,
where `cuda` is `cuda:0`. A device list (engine.devices, --devices) is "all", for
every CUDA GPU present, or a list of distinct CUDA devices, one worker each; the
empty list means one worker on the single device.

No torch here: the config is read and checked before torch is imported, and by
commands that never import it.
"""

from __future__ import annotations

import re

ALL = "all"

_CUDA = re.compile(r"cuda(?::([0-9]+))?")


def cuda_index(name: str) -> int | None:
    """The GPU index a CUDA device names (0 for `cuda`); None for any other name."""
    match = _CUDA.fullmatch(name)
    if match is None:
        return None
    return int(match[1] or 0)


def is_cuda(name: str) -> bool:
    return cuda_index(name) is not None


def check_device(name: str) -> str | None:
    """None for a device name, else the problem, worded to follow the setting's name."""
    if name in ("auto", "cpu") or is_cuda(name):
        return None
    return f"must be auto, cpu, cuda or cuda:N, got {name!r}"


def check_device_list(value: tuple[str, ...] | str) -> str | None:
    """None for a device list, else the problem, worded to follow the setting's name."""
    if value == ALL:
        return None
    if isinstance(value, str):
        return f"must be \"all\" or a list of CUDA devices, got {value!r}"
    for name in value:
        if not is_cuda(name):
            return f"must list CUDA devices (cuda:N), got {name!r}"
    # Two workers on one GPU would each load the model and fight over its memory.
    if len({cuda_index(name) for name in value}) != len(value):
        return f"names a device twice: {list(value)}"
    return None


def parse_device_list(text: str) -> tuple[str, ...] | str:
    """A device list as a command line gives it: "all", or names separated by
    commas ("cuda:0,cuda:1"); an empty text is the empty list.

    Raises ValueError with check_device_list's words for anything else.
    """
    text = text.strip()
    if text == ALL:
        return ALL
    value = tuple(name.strip() for name in text.split(",")) if text else ()
    problem = check_device_list(value)
    if problem:
        raise ValueError(problem)
    return value


def resolve_devices(devices: tuple[str, ...] | str, single: str, cuda_count: int) -> list[str]:
    """The device of each worker, given a checked device list, the single device
    (model.device) and how many CUDA GPUs there are.

    "all" without a GPU falls back to one worker on the CPU rather than none.
    """
    if devices == ALL:
        return [f"cuda:{index}" for index in range(cuda_count)] or ["cpu"]
    return list(devices) or [single]
