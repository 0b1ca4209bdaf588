"""One handle per model: where it is, and how it is run (device, dtype, offload).

`open_model(spec, device, dtype, offload)` resolves a spec once and decides:
- the working dtype: `auto` keeps the checkpoint's (the dtype most of its floating
  bytes are stored in: bf16 for most released models, float32 for a de-quantized
  GGUF), or float32 / bfloat16 / float16;
- the offload: `none` keeps every weight resident on the device, `disk` leaves them
  in the safetensors files and materialises one block at a time
  (spectra.io.offload), `auto` keeps them resident when they take at most half of
  the memory that is free, else streams them;
- whether it fits at all: resident needs the whole model, streamed the modules
  outside the blocks plus the largest block, each with a margin for the work. A model
  that cannot fit is refused here, before any work, with one line naming the need.
"""

from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass

from spectra.errors import SpectraInputError
from spectra.io import models
from spectra.io.tensors import read_header

DTYPES = ("auto", "float32", "bfloat16", "float16")
OFFLOADS = ("auto", "none", "disk")
_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8}
_STORED = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float32"}
RESIDENT_SHARE = 0.5  # `auto` streams a model that would take more of the free memory
WORK_MARGIN = 1.25  # activations, Grams and the factorization's scratch beside weights
_BLOCK = re.compile(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)\.")


@dataclass(frozen=True)
class Handle:
    """A resolved model and the way it is run; built by `open_model`."""

    spec: str
    source: models.Source
    device: str
    dtype: str  # the working dtype: float32 | bfloat16 | float16
    offload: str  # none | disk

    @functools.cached_property
    def fingerprint(self) -> str:
        return models.fingerprint(self.spec)

    @property
    def torch_dtype(self):
        import torch

        return getattr(torch, self.dtype)

    def load(self):
        """The model: resident on the device, or a skeleton whose blocks stay on disk."""
        if self.offload == "none":
            return models.load(self.spec, self.device, self.torch_dtype)
        from spectra.io.offload import skeleton

        models.require_config(self.source)
        return skeleton(self.source.root, self.source.files, self.torch_dtype, self.device)

    def tokenizer(self):
        return models.load_tokenizer(self.spec)

    def describe(self) -> dict:
        """dtype, device, offload, the memory it expects to use resident and streamed
        (weights with the work margin) and the memory free now, in GB."""
        need = footprint(self.source, self.dtype)
        free = free_bytes(self.device)
        return dict(
            dtype=self.dtype,
            device=self.device,
            offload=self.offload,
            resident_gb=round(need["total"] * WORK_MARGIN / 1e9, 3),
            streamed_gb=round((need["outer"] + need["block"]) * WORK_MARGIN / 1e9, 3),
            free_gb=None if free is None else round(free / 1e9, 3),
        )


def open_model(
    spec: str, device: str = "auto", dtype: str = "auto", offload: str = "auto"
) -> Handle:
    """Resolve `spec` and choose its dtype and offload (see the module docstring)."""
    if dtype not in DTYPES:
        raise SpectraInputError(f"--dtype {dtype}: expected one of {', '.join(DTYPES)}")
    if offload not in OFFLOADS:
        raise SpectraInputError(f"--offload {offload}: expected one of {', '.join(OFFLOADS)}")
    source = models.resolve(spec)
    device = models.resolve_device(device)
    dtype = stored_dtype(source) if dtype == "auto" else dtype
    check_dtype(dtype, device)
    need = footprint(source, dtype)
    free = free_bytes(device)
    resident = need["total"] * WORK_MARGIN
    streamed = (need["outer"] + need["block"]) * WORK_MARGIN
    if offload == "auto":
        offload = "none" if free is None or resident <= RESIDENT_SHARE * free else "disk"
    if free is not None:
        wanted = resident if offload == "none" else streamed
        if wanted > free:
            hint = "; try --offload disk" if offload == "none" and streamed <= free else ""
            raise SpectraInputError(
                f"{spec}: needs about {wanted / 1e9:.3g} GB of {_where(device)} memory in "
                f"{dtype} with --offload {offload}, {free / 1e9:.3g} GB is free{hint}"
            )
    return Handle(spec, source, device, dtype, offload)


def stored_dtype(source: models.Source) -> str:
    """The dtype most of the checkpoint's floating-point bytes are stored in."""
    sizes: dict[str, int] = {}
    for f in source.files:
        for ref in read_header(f):
            if ref.dtype in _STORED:
                sizes[_STORED[ref.dtype]] = sizes.get(_STORED[ref.dtype], 0) + ref.nbytes
    return max(sizes, key=sizes.get) if sizes else "float32"


def footprint(source: models.Source, dtype: str) -> dict:
    """Bytes in `dtype`: `total`, `outer` (outside the blocks) and the largest `block`."""
    per_block: dict[int, int] = {}
    outer = 0
    for f in source.files:
        for ref in read_header(f):
            if ref.dtype not in _STORED:
                continue
            size = ref.nbytes // _BYTES[_STORED[ref.dtype]] * _BYTES[dtype]
            m = _BLOCK.search(ref.name)
            if m:
                per_block[int(m.group(1))] = per_block.get(int(m.group(1)), 0) + size
            else:
                outer += size
    block = max(per_block.values(), default=0)
    return {"total": outer + sum(per_block.values()), "outer": outer, "block": block}


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


def _where(device: str) -> str:
    return "GPU" if device.startswith("cuda") else "host"
