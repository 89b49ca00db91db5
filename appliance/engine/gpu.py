"""What the engine asks of CUDA. torch is imported only inside these functions, so the
engine's pure parts (queue, worker loop, writers) import without it."""

from __future__ import annotations

import gc
import logging
import os
import sys
from collections.abc import Iterator

from appliance.core.config import EngineConfig, memory_budget_bytes
from appliance.core.devices import cuda_index

log = logging.getLogger(__name__)

GIB = 2**30


def cuda_devices() -> list[str]:
    """cuda:0, cuda:1, ... for every CUDA GPU present; [] without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return []
    return [f"cuda:{index}" for index in range(torch.cuda.device_count())]


def _torch_using_cuda():  # -> the torch module, or None
    # Only where this process already runs CUDA: asking would otherwise start a
    # CUDA context (slow, and memory on every GPU) from a metrics scrape.
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    return torch


def memory_by_device() -> Iterator[tuple[str, str, float]]:
    """(device, kind, bytes): allocated and reserved by torch, free and total on the device."""
    torch = _torch_using_cuda()
    if torch is None:
        return
    for index in range(torch.cuda.device_count()):
        device = f"cuda:{index}"
        yield device, "allocated", float(torch.cuda.memory_allocated(index))
        yield device, "reserved", float(torch.cuda.memory_reserved(index))
        free, total = torch.cuda.mem_get_info(index)
        yield device, "free", float(free)
        yield device, "total", float(total)


def log_peak_memory() -> None:
    torch = _torch_using_cuda()
    if torch is None:
        return
    for index in range(torch.cuda.device_count()):
        if torch.cuda.max_memory_allocated(index):
            log.info("peak GPU memory on cuda:%d: %.2f GiB allocated, %.2f GiB reserved", index,
                     torch.cuda.max_memory_allocated(index) / GIB,
                     torch.cuda.max_memory_reserved(index) / GIB)


def device_memory_bytes(device: str) -> int:
    """The device's whole memory: a GPU's, or the machine's for the CPU."""
    if device == "auto":
        from appliance.engine.pipeline import pick_device

        device = pick_device(device)
    index = cuda_index(device)
    if index is None:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    import torch

    return int(torch.cuda.get_device_properties(index).total_memory)


def memory_budget(engine: EngineConfig, device: str) -> int:
    """engine.gpu_memory_budget in bytes for `device` (checked when the config loaded)."""
    return memory_budget_bytes(engine.gpu_memory_budget, device_memory_bytes(device))


def release_unloaded_models() -> None:
    """Frees the memory of models just unloaded, for the next model to use: their last
    references are gone, but torch modules hold reference cycles, which only a full
    collection frees; then the GPU's cache gives the blocks back to the device."""
    gc.collect()
    torch = _torch_using_cuda()
    if torch is not None:
        torch.cuda.empty_cache()
