"""A compressed OUT of `spectra apply`, opened as one more kind of model.

`open_out(path, device, dtype, offload)` returns a `Compressed`: the same object the
rest of Spectra takes for a dense model (spectra.io.model.Model), whose `load()`
rebuilds the compact modules (whole, or a block at a time from the OUT's parts),
whose `tokenizer()` is the one saved beside the factors and whose `baseline()` opens
the dense model it was compressed from, run the same way. So eval, heal and export do
not branch on what they were given.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

from compressors import io
from spectra.errors import SpectraInputError
from spectra.io import models
from spectra.io.devices import free_bytes
from spectra.io.model import (
    OFFLOADS,
    RESIDENT_SHARE,
    WORK_MARGIN,
    Model,
    majority_dtype,
    open_model,
)


@dataclass(frozen=True, eq=False)
class Compressed(Model):
    """An apply output; `cast`: whether `load()` casts to `dtype` (False: as stored)."""

    cast: bool = False
    kind = "compressed"

    @functools.cached_property
    def report(self) -> dict:
        try:
            data = json.loads((self.source.root / "report.json").read_text())
        except (OSError, ValueError) as e:
            raise SpectraInputError(f"{self.spec}: unreadable report.json ({e})") from e
        return data if isinstance(data, dict) else {}

    def load(self):
        """The compressed model: whole with its factorizations kept by `factorizations`,
        or a skeleton built a block at a time from the OUT's parts (offload disk)."""
        import torch

        dtype = getattr(torch, self.dtype) if self.cast else None
        if self.offload == "disk":
            from compressors import streamed_out

            return streamed_out.load(self.source.root, self.device, dtype)
        model = io.load(self.source.root, self.device)[0]
        return model if dtype is None else model.to(dtype)

    def load_with_factors(self):
        """(model, factorizations) resident: what healing trains and saving writes."""
        return io.load(self.source.root, self.device)

    def _read_tokenizer(self):
        """The tokenizer saved beside the factors (Model.tokenizer remembers it)."""
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(self.source.root)
        except (OSError, ValueError) as e:
            raise SpectraInputError(f"{self.spec}: no usable tokenizer in the checkpoint") from e

    def baseline(
        self, dtype: str | None = None, offload: str | None = None, fit: bool = True
    ) -> Model:
        """The dense model this OUT was compressed from, run the same way (or in `dtype`,
        held as `offload`; `fit`: as open_model's)."""
        source = self.report.get("model")
        if not source:
            raise SpectraInputError(f"{self.spec}/report.json: does not name its source model")
        dtype = dtype or (self.dtype if self.cast else "auto")
        return open_model(source, self.device, dtype, offload or self.offload, fit=fit)

    def describe(self) -> dict:
        return {"offload": self.offload}


def open_out(path, device: str = "auto", dtype: str = "auto", offload: str = "auto") -> Compressed:
    """Open the apply output at `path` (bad input when it is not one)."""
    path = Path(path)
    if not io.is_compressed_checkpoint(path):
        raise SpectraInputError(f"{path}: not a `spectra apply` output (no manifest.json)")
    if offload not in OFFLOADS:
        raise SpectraInputError(f"--offload {offload}: expected one of {', '.join(OFFLOADS)}")
    refs = io.check_parts(path)  # a missing or truncated part is named here, before any work
    shards = io.shard_files(path)
    files = tuple(path / p for p in shards["factors"] + shards["dense"])
    config = (
        json.loads((path / "config.json").read_text()) if (path / "config.json").is_file() else {}
    )
    source = models.Source(str(path), "compressed", path, files, config.get("model_type"))
    stored = majority_dtype(r for part in refs.values() for r in part.values())
    return Compressed(
        str(path),
        source,
        models.resolve_device(device),
        stored if dtype == "auto" else dtype,
        choose_offload(path, offload),
        cast=dtype != "auto",
    )


def choose_offload(out: Path, offload: str) -> str:
    """`none` or `disk` for an OUT: `auto` streams an OUT that was written block by
    block or that would take over half the free memory; one that cannot be loaded
    whole with `none` is refused here, before any work, with what it needs."""
    shards = io.shard_files(out)
    files = [out / p for p in shards["factors"] + shards["dense"]]
    # loaded whole: OUT's tensors and the float32 reconstruction beside them
    size = sum(p.stat().st_size for p in files if p.is_file())
    need = 3 * size * WORK_MARGIN
    free = free_bytes("cpu")
    if offload == "auto":
        blockwise = len(shards["dense"]) > 1  # written block by block (io.Writer)
        fits = free is None or need <= RESIDENT_SHARE * free
        return "disk" if blockwise or not fits else "none"
    if offload == "none" and free is not None and need > free:
        raise SpectraInputError(
            f"{out}: needs about {need / 1e9:.3g} GB of host memory to load whole "
            f"(--offload none), {free / 1e9:.3g} GB is free; try --offload disk"
        )
    return offload
