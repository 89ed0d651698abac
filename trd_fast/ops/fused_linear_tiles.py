"""The tile buffer of the fused linear loss, kept from one call to the next on CPU.

A fresh [R, Vc] tile costs its first-touch page faults on every call: 65,536 faults for 256 MiB with 4 KiB
pages, 0.1 to 0.2 s on a 2-core Xeon, up to a tenth of a whole forward + backward at V = 32768. So a CPU call
takes the buffer the last call left (when it is large enough; else a new one) and leaves it for the next. At
most one buffer per device and dtype is kept, at most the size of the largest call's tiles (the tile budget);
a call running while another holds the buffer gets a new one. release_tile_buffers() frees them. CUDA tiles come
from the caching allocator, which already reuses memory without faults.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Iterator

import torch

REUSED_DEVICE_TYPES = ("cpu",)

_lock = threading.Lock()
_kept: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}  # flat buffers not in use


@contextmanager
def tile_buffer(numel: int, dtype: torch.dtype, device: torch.device) -> Iterator[torch.Tensor]:
    """A flat buffer [numel] of `dtype` on `device` for the duration of the block (contents undefined)."""
    if device.type not in REUSED_DEVICE_TYPES:
        yield torch.empty(numel, dtype=dtype, device=device)
        return
    key = (device, dtype)
    with _lock:
        buffer = _kept.pop(key, None)
    if buffer is None or buffer.numel() < numel:
        buffer = None  # the smaller kept buffer is freed before the new one is allocated
        buffer = torch.empty(numel, dtype=dtype, device=device)
    try:
        yield buffer[:numel]
    finally:
        with _lock:
            other = _kept.get(key)
            if other is None or other.numel() < buffer.numel():
                _kept[key] = buffer


def _kept_bytes() -> int:
    return sum(b.numel() * b.element_size() for b in _kept.values())


def kept_tile_bytes() -> int:
    """Bytes of the tile buffers kept between calls."""
    with _lock:
        return _kept_bytes()


def release_tile_buffers() -> int:
    """Frees the tile buffers kept between calls; returns the bytes freed."""
    with _lock:
        freed = _kept_bytes()
        _kept.clear()
    return freed
