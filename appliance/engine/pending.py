"""A batch's pixels on their way from the GPU to the threads that save them."""

from __future__ import annotations

import threading
import time

import numpy as np
import torch
from PIL import Image


class PendingImages:
    """Pixels on their way from the GPU into pinned CPU memory.

    The GPU thread starts the copy and moves on to the next batch; the first
    writer thread that needs an image waits for the copy here.
    """

    def __init__(self, pixels: torch.Tensor, started: float, count: int | None = None):
        self._started = started
        self._lock = threading.Lock()
        self._array: np.ndarray | None = None
        self._count = len(pixels) if count is None else count
        self.seconds: float | None = None
        if pixels.device.type == "cuda":
            self._host = torch.empty(pixels.shape, dtype=pixels.dtype, pin_memory=True)
            self._host.copy_(pixels, non_blocking=True)
            self._copied: torch.cuda.Event | None = torch.cuda.Event()
            self._copied.record(torch.cuda.current_stream(pixels.device))
        else:
            self._host, self._copied = pixels, None

    def __len__(self) -> int:
        return self._count

    def image(self, index: int) -> Image.Image:
        with self._lock:
            if self._array is None:
                if self._copied is not None:
                    # Releases the GIL while it waits, so the GPU thread runs on.
                    self._copied.synchronize()
                self._array = self._host.numpy()
                self.seconds = time.perf_counter() - self._started
        return Image.fromarray(self._array[index])
