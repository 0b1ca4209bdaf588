"""Calibration: the windows every data-aware step reads, and the cached Grams of them.

`calibrate(model, settings)` gives, for every linear module inside a transformer
block, H = X^T X of its inputs from the dense model on the calibration windows and
the number of token rows in it (compressors.activations: layer-wise, modules that
read one tensor share one H). The result is cached under cache/calibration/<key>/,
one safetensors file per block (float32: H is summed in float64 and stored in
float32, as GPTQ keeps it) plus meta.json, keyed by the weights' content
fingerprint, the calibration windows' token ids (so corpus, tokenizer, BOS, sample
count, window length and seed all enter) and CALIB_VERSION. The folder is built
under a temporary name and renamed; a missing, truncated or unreadable file makes
the whole entry a miss, recomputed. A hit reads one block at a time, when asked.

So that a repeat needs no tokenizer, each entry also gets an alias under
cache/calibration/aliases/: keyed by the fingerprint, the bytes of the model's
tokenizer files, the corpus (its file's bytes) and the settings, naming the entry.
An alias only ever points at an entry whose own key was checked when it was made.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from spectra.data import perplexity as ev
from spectra.errors import SpectraInputError
from spectra.io import cache
from spectra.io.model import Model, open_model

CALIB_VERSION = 1
DEFAULT_TOKENS = 32_768
DEFAULT_SEQLEN = 512
log = logging.getLogger("spectra")


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


def for_model(model: Model, corpus="builtin", tokens=None, seqlen=None, seed=0) -> CalibrationSpec:
    """The calibration of `model` with these settings; an unset seqlen is DEFAULT_SEQLEN
    or the model's context when that is shorter (the token count kept)."""
    if seqlen is None:
        context = model.context_length
        seqlen = min(DEFAULT_SEQLEN, context) if context else DEFAULT_SEQLEN
    return CalibrationSpec.from_tokens(corpus, tokens, seqlen, seed)


def check_context(model: Model, settings: CalibrationSpec) -> None:
    """Windows longer than the model's positions are refused, naming both."""
    context = model.context_length
    if context is not None and settings.seqlen > context:
        raise SpectraInputError(
            f"calibration seqlen {settings.seqlen}: longer than the {context} positions of {model}"
        )


def calibration_windows(tokenizer, spec: CalibrationSpec):
    """`samples` windows of `seqlen` calibration tokens, chosen with `seed`.

    A corpus with fewer windows gives all it has (with a warning); one with less than
    one window is an error.
    """
    import torch  # deferred: plans import this module, and `spectra --help` imports plans

    ids = ev.token_stream(tokenizer, spec.corpus, "calib").windows(spec.seqlen)
    if ids.shape[0] < spec.samples:
        log.warning(
            f"calibration corpus {spec.corpus}: {ids.shape[0]} windows of {spec.seqlen} "
            f"tokens, fewer than the {spec.samples} asked for; using all of them"
        )
    pick = torch.randperm(ids.shape[0], generator=torch.Generator().manual_seed(spec.seed))
    return ids[pick[: spec.samples]]


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

    def __contains__(self, name) -> bool:
        return name in self.block_of

    def __iter__(self):
        return iter(self.block_of)

    def __len__(self) -> int:
        return len(self.block_of)


def calibrate(
    model: Model,
    settings: CalibrationSpec | None = None,
    *,
    network=None,
    use_cache: bool = True,
    progress=None,
    info: dict | None = None,
    ray: str | None = None,
) -> Grams:
    """The cached calibration of `model` (computed on a miss; see the module doc).

    `network`: the loaded torch model to run, if the caller holds one it may change
    later (apply); else the model's shared one (`Model.shared`: resident or streamed,
    in its working dtype, as it was opened). Before computing, the entry's size is
    estimated, logged, and refused (input error) when the cache's disk cannot hold it.
    `info` is filled with `cached`, `path`, `tokens`, `seconds`. `ray`: compute a miss
    on the Ray cluster at that address (`auto`, HOST:PORT), the windows split into one
    shard per task (`sharded`).
    """
    settings = settings or for_model(model)
    check_context(model, settings)
    info = {} if info is None else info
    t0 = time.perf_counter()
    alias = _alias(model, settings)
    if use_cache:
        hit = _via_alias(alias)
        if hit is not None:
            info.update(cached=True, path=str(hit.folder), tokens=hit.tokens)
            info.update(seconds=time.perf_counter() - t0)
            return hit
    windows = calibration_windows(model.tokenizer(), settings)
    folder = _folder(model, windows)
    info.update(cached=False, path=str(folder), tokens=int(windows.numel()))
    if use_cache:
        hit = _open(folder)
        if hit is not None:
            _write_alias(alias, folder)
            info.update(cached=True, seconds=time.perf_counter() - t0)
            return hit
    from compressors.activations import block_grams  # deferred: the model stack

    if ray is not None:
        stream = sharded(model, windows, ray, progress)
    else:
        network = network if network is not None else model.shared()
        check_disk(folder, entry_bytes(network))
        stream = block_grams(network, windows, progress)
    meta = _meta(model, settings, windows)
    with _building(folder) as tmp:
        for block, grams in stream:
            meta["blocks"][str(block)] = _write_block(tmp, block, grams, release=True)
        meta["seconds"] = time.perf_counter() - t0
        cache.write_json(tmp / "meta.json", meta)
    info.update(seconds=meta["seconds"])
    out = _open(folder)
    if out is None:  # e.g. the cache folder is not writable
        raise RuntimeError(f"{folder}: calibration was written but cannot be read back")
    _write_alias(alias, folder)
    return out


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


def sharded(model: Model, windows, address: str, progress=None):
    """block_grams of `model` on a Ray cluster: the windows cut into one shard per task
    (whole batches of activations.BATCH windows, at most one per CPU or GPU), every task
    loading the model from its path (one every node sees) and streaming its blocks'
    Grams; the driver sums block k over the shards (float64, shard order) and yields
    it before it asks for block k + 1, so it holds one block per shard at a time.
    """
    from compressors.activations import BATCH
    from spectra.linalg import cluster

    root, device = str(model.source.root), model.device
    info = cluster.connect(address)
    try:
        gpu = info["gpus"] > 0 and device != "cpu"
        if device.startswith("cuda") and not gpu:
            raise SpectraInputError(f"--device {device}: the Ray cluster has no GPUs")
        slots = max(1, info["gpus"] if gpu else info["cpus"])
        batches = math.ceil(len(windows) / BATCH)
        per = math.ceil(batches / min(slots, batches)) * BATCH
        jobs = [
            ShardJob(
                root,
                windows[lo : lo + per].clone(),
                "cuda" if gpu else "cpu",
                model.dtype,
                f"windows {lo}-",
            )
            for lo in range(0, len(windows), per)
        ]
        shards = cluster.streams(shard_grams, jobs, num_gpus=1 if gpu else 0)
        for index, parts in enumerate(shards):
            yield index, _sum_shards([grams for _, grams in parts])
            if progress:
                progress(index + 1, parts[0][0], f"block {index}")
    finally:
        cluster.disconnect(info)


@dataclass(frozen=True)
class ShardJob:
    root: str  # the model's directory, as every node sees it
    windows: object  # (windows, seqlen) token ids
    device: str
    dtype: str  # the driver's working dtype
    name: str


def shard_grams(job: ShardJob):
    """A Ray task (an entry point: it opens the model itself): (blocks, Grams) of one
    shard's windows, block by block."""
    from compressors.activations import block_grams
    from compressors.blocks import decoder_layers

    model = open_model(job.root, job.device, job.dtype, "none").load()
    layers = len(decoder_layers(model))
    for _, grams in block_grams(model, job.windows):
        yield layers, grams


def _sum_shards(parts: list[dict]) -> dict:
    """{name: (H, rows)} summed over shards; modules sharing an H keep sharing one."""
    out, by_id = {}, {}
    for name, (h, _) in parts[0].items():
        if id(h) not in by_id:
            total = parts[0][name][0].clone()
            for p in parts[1:]:
                total += p[name][0]
            by_id[id(h)] = (total, sum(p[name][1] for p in parts))
        out[name] = by_id[id(h)]
    return out


TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
)


def _alias(model: Model, settings: CalibrationSpec) -> Path | None:
    """Where the alias of (weights, dtype, tokenizer, corpus, settings) lives; None when
    the corpus cannot be pinned by its bytes (then only the windows' key is used)."""
    root = model.source.root
    tok = [
        cache.hash_bytes((root / f).read_bytes()) for f in TOKENIZER_FILES if (root / f).is_file()
    ]
    if settings.corpus == "builtin":
        import pydoc_data.topics

        corpus = cache.hash_bytes(Path(pydoc_data.topics.__file__).read_bytes())
    elif Path(settings.corpus).is_file():
        corpus = cache.hash_bytes(Path(settings.corpus).read_bytes())
    else:
        return None
    key = model.cache_key(CALIB_VERSION, tok, corpus, settings.windows_key)
    return cache.cache_dir() / "calibration" / "aliases" / f"{key}.json"


def _via_alias(alias: Path | None) -> Grams | None:
    data = cache.read_json(alias) if alias is not None else None
    if not isinstance(data, dict) or not isinstance(data.get("folder"), str):
        return None
    return _open(alias.parent.parent / data["folder"])


def _write_alias(alias: Path | None, folder: Path) -> None:
    if alias is not None:
        cache.write_json(alias, {"folder": folder.name})


def cached(model: Model, settings: CalibrationSpec | None = None) -> Grams | None:
    """The calibration of `model` if it is already in the cache (nothing is computed);
    None also when the model has no tokenizer or corpus to calibrate with."""
    try:
        settings = settings or for_model(model)
        hit = _via_alias(_alias(model, settings))  # as calibrate's hit: no tokenizer
        if hit is not None:
            return hit
        windows = calibration_windows(model.tokenizer(), settings)
    except SpectraInputError:
        return None
    return _open(_folder(model, windows))


def _folder(model: Model, windows) -> Path:
    """Where the calibration of `model` on `windows` lives: keyed by weights, working
    dtype and token ids."""
    key = model.cache_key(CALIB_VERSION, cache.hash_bytes(windows.numpy()))
    return cache.cache_dir() / "calibration" / key


def latest(model: Model) -> Grams | None:
    """The newest cached calibration of these weights in this working dtype, whatever its
    settings (None if there is none): what `plan auto` scores with when it is not told."""
    found = []
    for meta_path in (cache.cache_dir() / "calibration").glob("*/meta.json"):
        meta = cache.read_json(meta_path)
        if (
            isinstance(meta, dict)
            and meta.get("fingerprint") == model.fingerprint
            and meta.get("dtype") == model.dtype
            and not meta.get("sequential")  # a plan's own Grams, not the model's
        ):
            found.append((meta_path.stat().st_mtime, meta_path.parent))
    for _, folder in sorted(found, reverse=True):
        grams = _open(folder)
        if grams is not None:
            return grams
    return None


def sequential(
    model: Model,
    settings: CalibrationSpec,
    plan_key: str,
    run,
    *,
    use_cache: bool = True,
    info: dict | None = None,
):
    """`run(grams=..., calib_ids=..., on_grams=...)` (compressors.apply's arguments)
    with sequential calibration of the plan whose resolved settings hash to `plan_key`:
    on a miss it runs on the calibration windows, recording each block's Grams (the
    outputs of the blocks before it as compressed) under their own key (weights,
    windows, plan); on a hit it runs on those Grams, which gives the same result.
    """
    info = {} if info is None else info
    windows = calibration_windows(model.tokenizer(), settings)
    key = model.cache_key(CALIB_VERSION, cache.hash_bytes(windows.numpy()), "sequential", plan_key)
    folder = cache.cache_dir() / "calibration" / key
    info.update(path=str(folder), tokens=int(windows.numel()))
    hit = _open(folder) if use_cache else None
    info.update(cached=hit is not None)
    if hit is not None:
        return run(grams=hit, calib_ids=None, on_grams=None)
    if not use_cache:
        return run(grams=None, calib_ids=windows, on_grams=None)
    meta = _meta(model, settings, windows, sequential=plan_key)
    with _building(folder) as tmp:

        def record(block: int, grams: dict) -> None:
            meta["blocks"][str(block)] = _write_block(tmp, block, grams)  # apply reads them next

        result = run(grams=None, calib_ids=windows, on_grams=record)
        cache.write_json(tmp / "meta.json", meta)
    return result


def _meta(model: Model, settings: CalibrationSpec, windows, **extra) -> dict:
    """meta.json of a calibration folder (its blocks filled in as they are written)."""
    return {
        "version": CALIB_VERSION,
        "model": model.spec,
        "fingerprint": model.fingerprint,
        "dtype": model.dtype,
        **extra,
        "corpus": settings.corpus,
        "samples": int(windows.shape[0]),
        "seqlen": settings.seqlen,
        "seed": settings.seed,
        "tokens": int(windows.numel()),
        "bos": ev.bos_token(model.tokenizer()),
        "blocks": {},
    }


def _write_block(folder: Path, block: int, grams: dict, release: bool = False) -> dict:
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
def _building(final: Path):
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
    return _open(Path(folder))


def _open(folder: Path) -> Grams | None:
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
