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

import logging
import time
from pathlib import Path

from spectra.data import calib_ray
from spectra.data import perplexity as ev
from spectra.data.grams import (
    CALIB_VERSION,
    DEFAULT_SEQLEN,
    DEFAULT_TOKENS,
    CalibrationSpec,
    Grams,
    building,
    check_disk,
    entry_bytes,
    open_entry,
    open_folder,
    write_block,
)
from spectra.errors import SpectraInputError
from spectra.io import cache
from spectra.io.model import Model

log = logging.getLogger("spectra")

__all__ = [
    "DEFAULT_SEQLEN",
    "DEFAULT_TOKENS",
    "CalibrationSpec",
    "Grams",
    "check_disk",
    "open_folder",
]  # read by callers through this module


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
        hit = open_entry(folder)
        if hit is not None:
            _write_alias(alias, folder)
            info.update(cached=True, seconds=time.perf_counter() - t0)
            return hit
    from compressors.activations import block_grams  # deferred: the model stack

    if ray is not None:
        stream = calib_ray.sharded(model, windows, ray, progress)
    else:
        network = network if network is not None else model.shared()
        check_disk(folder, entry_bytes(network))
        stream = block_grams(network, windows, progress)
    meta = _meta(model, settings, windows)
    with building(folder) as tmp:
        for block, grams in stream:
            meta["blocks"][str(block)] = write_block(tmp, block, grams, release=True)
        meta["seconds"] = time.perf_counter() - t0
        cache.write_json(tmp / "meta.json", meta)
    info.update(seconds=meta["seconds"])
    out = open_entry(folder)
    if out is None:  # e.g. the cache folder is not writable
        raise RuntimeError(f"{folder}: calibration was written but cannot be read back")
    _write_alias(alias, folder)
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
    return open_entry(alias.parent.parent / data["folder"])


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
    return open_entry(_folder(model, windows))


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
        grams = open_entry(folder)
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
    hit = open_entry(folder) if use_cache else None
    info.update(cached=hit is not None)
    if hit is not None:
        return run(grams=hit, calib_ids=None, on_grams=None)
    if not use_cache:
        return run(grams=None, calib_ids=windows, on_grams=None)
    meta = _meta(model, settings, windows, sequential=plan_key)
    with building(folder) as tmp:

        def record(block: int, grams: dict) -> None:
            meta["blocks"][str(block)] = write_block(tmp, block, grams)  # apply reads them next

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
