"""A calibration on disk: the cached Grams of one model's calibration windows.

`calibrate` (spectra.data.calibration) writes an entry under cache/calibration/<key>/:
one safetensors file of float32 Grams per block (modules reading one tensor share one
H) plus meta.json, built in a temporary folder and renamed (`building`). `Grams` reads
an entry a block at a time, when asked; `open_entry` treats a missing, truncated or
garbage file as a miss. Before computing, `entry_bytes` and `check_disk` say how big an
entry will be and refuse one the disk cannot hold.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from spectra.errors import SpectraInputError
from spectra.io import cache

CALIB_VERSION = 1
log = logging.getLogger("spectra")
DEFAULT_TOKENS = 32_768
DEFAULT_SEQLEN = 512


@dataclass(frozen=True)
class CalibrationSpec:
    """Where calibration activations come from (builtin = the stdlib's pydoc topics).

    `samples` windows of `seqlen` tokens, drawn with `seed` from the corpus's
    calibration part (never its evaluation part). `sequential`: a plan's blocks are
    calibrated on the outputs of the blocks before them as already compressed (see
    `sequential_grams`), instead of on the dense model's (the cached Grams).
    """

    corpus: str = "builtin"
    samples: int = DEFAULT_TOKENS // DEFAULT_SEQLEN
    seqlen: int = DEFAULT_SEQLEN
    seed: int = 0
    sequential: bool = False

    @property
    def windows_key(self) -> dict:
        """The settings that choose the windows (what the dense Grams depend on)."""
        return dict(corpus=self.corpus, samples=self.samples, seqlen=self.seqlen, seed=self.seed)

    @property
    def tokens(self) -> int:
        return self.samples * self.seqlen

    @staticmethod
    def from_tokens(corpus="builtin", tokens=DEFAULT_TOKENS, seqlen=DEFAULT_SEQLEN, seed=0):
        """The spec for `tokens` calibration tokens in windows of `seqlen` (rounded down)."""
        tokens = DEFAULT_TOKENS if tokens is None else tokens
        seqlen = DEFAULT_SEQLEN if seqlen is None else seqlen
        if not isinstance(seqlen, int) or seqlen < 2:
            raise SpectraInputError(f"--seqlen {seqlen}: must be an integer >= 2")
        if not isinstance(tokens, int) or tokens < seqlen:
            raise SpectraInputError(
                f"--tokens {tokens}: must be at least one window of --seqlen {seqlen}"
            )
        return CalibrationSpec(corpus, tokens // seqlen, seqlen, seed)


class Grams:
    """A calibration on disk: `grams[block]` -> {module: (H, rows)}, H a float32 tensor,
    read lazily.

    Modules that share an input share one tensor within a block's result.
    """

    def __init__(self, folder: Path, meta: dict):
        self.folder, self.meta = folder, meta

    @property
    def settings(self) -> CalibrationSpec:
        """The settings it was computed with (samples: the windows actually used)."""
        m = self.meta
        return CalibrationSpec(m["corpus"], m["samples"], m["seqlen"], m["seed"])

    @property
    def blocks(self) -> list[int]:
        return sorted(int(b) for b in self.meta["blocks"])

    @property
    def tokens(self) -> int:
        return int(self.meta["tokens"])

    def __contains__(self, block) -> bool:
        return str(block) in self.meta["blocks"]

    def __getitem__(self, block: int) -> dict[str, tuple]:
        from safetensors.torch import load_file

        entry = self.meta["blocks"][str(block)]
        tensors = load_file(self.folder / entry["file"])
        return {name: (tensors[owner], rows) for name, (owner, rows) in entry["modules"].items()}

    def hessians(self) -> Hessians:
        """Every module's H, for allocation's damage: a mapping that reads a block when
        one of its modules is asked for and keeps the last two blocks read (a big
        model's Grams never sit in memory all at once)."""
        return Hessians(self)


class Hessians(Mapping):
    """{module: H} over a Grams, read block by block (see Grams.hessians); thread-safe."""

    KEEP = 2  # blocks held: the units being built in parallel straddle at most two

    def __init__(self, grams: Grams):
        self.grams = grams
        self.block_of = {
            name: int(b) for b, entry in grams.meta["blocks"].items() for name in entry["modules"]
        }
        self.held: OrderedDict[int, dict] = OrderedDict()
        self.lock = threading.Lock()

    def __getitem__(self, name: str):
        block = self.block_of[name]  # KeyError for a module outside the calibration
        with self.lock:
            if block not in self.held:
                self.held[block] = {n: h for n, (h, _) in self.grams[block].items()}
                while len(self.held) > self.KEEP:
                    self.held.popitem(last=False)
            self.held.move_to_end(block)
            return self.held[block][name]

    def release(self) -> None:
        """Forget the blocks held (read again when asked for)."""
        with self.lock:
            self.held.clear()

    def __contains__(self, name) -> bool:
        return name in self.block_of

    def __iter__(self):
        return iter(self.block_of)

    def __len__(self) -> int:
        return len(self.block_of)


SHARED_INPUT = {"q": "qkv", "k": "qkv", "v": "qkv", "gate": "gate_up", "up": "gate_up"}


def entry_bytes(model) -> int:
    """Bytes a calibration of `model` stores: one float32 H (in x in) per block and input
    tensor (q, k, v read one tensor, gate and up another)."""
    from compressors.targets import linear_targets

    seen: dict[tuple, int] = {}
    for name, (t, _) in linear_targets(model).items():
        if t.block is not None:
            seen[(t.block, SHARED_INPUT.get(t.role, name))] = t.shape[1] ** 2 * 4
    return sum(seen.values())


def check_disk(folder: Path, need: int) -> None:
    """Say how big the entry at `folder` will be; refuse when the disk cannot hold it."""
    import shutil

    folder.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder.parent).free
    log.info(f"calibration entry: about {need / 1e9:.2f} GB at {folder.parent}")
    if need > free:
        raise SpectraInputError(
            f"calibration needs about {need / 1e9:.1f} GB at {folder.parent}, "
            f"{free / 1e9:.1f} GB is free: free space, set SPECTRA_CACHE elsewhere, or use "
            "`sequential: true` in the plan (each block's Grams computed and dropped)"
        )


def write_block(folder: Path, block: int, grams: dict, release: bool = False) -> dict:
    """Write a block's Grams (float32, one per shared input); `release` empties `grams`
    once converted, so the float64 sums are freed before the file is serialized."""
    from safetensors.torch import save_file

    owners: dict[int, str] = {}
    modules = {}
    for name, (h, rows) in grams.items():
        owner = owners.setdefault(id(h), name)
        modules[name] = [owner, int(rows)]
    tensors = {owner: grams[owner][0].float().contiguous() for owner in owners.values()}
    if release:
        grams.clear()
    file = f"block_{block:04d}.safetensors"
    save_file(tensors, str(folder / file))
    return {"file": file, "bytes": (folder / file).stat().st_size, "modules": modules}


@contextlib.contextmanager
def building(final: Path):
    """A temporary folder beside `final`, renamed over it on success, else removed."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        yield tmp
        if final.exists():  # a stale or corrupt entry
            shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def open_folder(folder: str | Path) -> Grams | None:
    """The calibration stored in `folder` (a Grams' folder), or None if it is not sound."""
    return open_entry(Path(folder))


def open_entry(folder: Path) -> Grams | None:
    """The calibration in `folder`, or None when it is missing, truncated or garbage."""
    meta = cache.read_json(folder / "meta.json")
    if not isinstance(meta, dict) or meta.get("version") != CALIB_VERSION:
        return None
    try:
        from safetensors import safe_open

        for entry in meta["blocks"].values():
            path = folder / entry["file"]
            if path.stat().st_size != entry["bytes"]:
                return None
            with safe_open(str(path), "pt") as f:
                owners = set(f.keys())
            if not {owner for owner, _ in entry["modules"].values()} <= owners:
                return None
    except Exception:  # OSError, a malformed meta.json, safetensors' header errors: a miss
        return None
    return Grams(folder, meta)
