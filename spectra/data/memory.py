"""Peak memory of a piece of work, above what was in use when it started.

On the CPU this is the process's resident set: Linux's high-water mark (VmHWM) is
reset through /proc/self/clear_refs at the start and read at the end. On CUDA it is
torch's peak of allocated device memory. Where neither can be read, `mb` is None.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

_STATUS = Path("/proc/self/status")


@dataclass
class Peak:
    mb: float | None = None


def _status_kb(field: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_hwm() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # 5: reset the peak RSS only
        return True
    except OSError:
        return False


def page_in(tensors) -> None:
    """Touch every page of `tensors`: weights that transformers maps from safetensors
    become resident only when first read, and belong to the model, not the work."""
    import torch

    with torch.no_grad():
        for t in tensors:
            if t.device.type == "cpu" and t.numel():
                t.reshape(-1)[:: max(1, 1024 // t.element_size())].sum()


@contextmanager
def peak(device=None):
    """`with peak(device) as p: ...` then p.mb is the peak above the start, in MB."""
    result = Peak()
    if device is not None and str(device).startswith("cuda"):
        import torch

        torch.cuda.synchronize(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        yield result
        result.mb = (torch.cuda.max_memory_allocated(device) - start) / 2**20
        return
    start = _status_kb("VmRSS")
    ok = start is not None and _reset_hwm()
    yield result
    top = _status_kb("VmHWM") if ok else None
    if top is not None:
        result.mb = max(0, top - start) / 1024
