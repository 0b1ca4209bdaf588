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


_tuned = False


def tune_allocator() -> None:
    """Keep glibc from unmapping every multi-megabyte temporary as soon as it is freed.

    Each matrix makes a few Gram-sized temporaries (numpy and LAPACK copies). By
    default glibc serves those with fresh mmaps and returns them at once, so every
    matrix page-faults its working set again: on the demo model that was 200k faults
    and 0.6 s of system time per cold analysis. With fixed thresholds (mmap above
    32 MiB, trim above 128 MiB) freed temporaries are reused; faults drop 20-fold for
    about 20 MB of retained memory. A no-op where glibc's mallopt is not available.
    """
    global _tuned
    if _tuned:
        return
    _tuned = True
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        libc.mallopt(m_mmap_threshold, 32 * 2**20)
        libc.mallopt(m_trim_threshold, 128 * 2**20)
    except (OSError, AttributeError):
        pass
