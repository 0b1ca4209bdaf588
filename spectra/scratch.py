"""Per-thread scratch buffers, reused across matrices.

Allocating fresh arrays for every matrix page-faults gigabytes of new memory on a
model the size of the demo, which cost more time than the arithmetic. A buffer
returned here is valid until the same thread asks for the same name again.
"""

from __future__ import annotations

import threading

import numpy as np

_local = threading.local()


def buffer(name: str, size: int, dtype=np.float64) -> np.ndarray:
    """A 1-D view of `size` elements of this thread's buffer `name`, grown as needed."""
    bufs = _local.__dict__.setdefault("bufs", {})
    buf = bufs.get((name, np.dtype(dtype)))
    if buf is None or buf.size < size:
        buf = bufs[(name, np.dtype(dtype))] = np.empty(size, dtype=dtype)
    return buf[:size]
