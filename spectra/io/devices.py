"""The devices the work runs on: the memory free on each, whether a dtype runs there,
and what its memory is called in a message."""

from __future__ import annotations

import os

from spectra.errors import SpectraInputError


def free_bytes(device: str) -> int | None:
    """Memory free for the work: MemAvailable on the CPU, the device's free memory on
    CUDA; SPECTRA_MEMORY_GB overrides (to plan for a smaller machine, and in tests)."""
    if os.environ.get("SPECTRA_MEMORY_GB"):
        return int(float(os.environ["SPECTRA_MEMORY_GB"]) * 1e9)
    if device.startswith("cuda"):
        import torch

        return int(torch.cuda.mem_get_info(torch.device(device))[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def check_dtype(dtype: str, device: str) -> None:
    """Refuse a dtype the device cannot multiply in (float16 on a CPU without it)."""
    if dtype != "float16" or device.startswith("cuda"):
        return
    import torch

    a = torch.ones(4, 4, dtype=torch.float16)
    try:
        (a @ a).sum().item()
    except RuntimeError as e:
        raise SpectraInputError(f"--dtype float16: this CPU cannot run it ({e})") from e


def where(device: str) -> str:
    return "GPU" if device.startswith("cuda") else "host"
