"""What the engine asks of CUDA. torch is imported only inside these functions, so the
engine's pure parts (queue, worker loop, writers) import without it."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator

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
