"""Analyse every 2-D weight of a model: spectra, metrics, MPO bond profiles, cached.

The result is a polars DataFrame with one row per unique matrix (tied weights are
analysed once, their other names listed in `aliases`) and the spectra kept as list
columns. Tables are cached under `cache_dir()/analysis`, keyed by the content hash
of every tensor, the settings and CACHE_VERSION.
"""

from __future__ import annotations

import collections
import functools
import math
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict

import numpy as np

from spectra import rows as rowlib
from spectra.errors import SpectraInputError
from spectra.io import cache
from spectra.io.model import Matrix, Model
from spectra.io.roles import ROLES
from spectra.linalg import mpo, scratch
from spectra.linalg.svd import singular_values_torch
from spectra.rows import AnalysisSettings, matrix_row  # noqa: F401 (their home was here)

Progress = Callable[[int, int, str], None]
GPU_BATCH_BYTES = 2 * 2**30  # float64 bytes of matrices moved to the GPU at once


def analyze(
    model: Model,
    cores: int = 3,
    with_mpo: bool = True,
    use_cache: bool = True,
    progress: Progress | None = None,
    settings: AnalysisSettings | None = None,
    info: dict | None = None,
    cached_only: bool = False,
    ray: str | None = None,
):
    """Analyse a model (spectra.io.model's Model, on its device); returns a polars
    DataFrame.

    Args:
        model: the model opened once by the caller (`open_model`).
        cores: MPO cores K for the bond profiles (2..6).
        with_mpo: compute the MPO bond profiles (False: spectra and metrics only).
        use_cache: read and write the on-disk cache.
        progress: called as progress(done, total, name) after each matrix.
        settings: full settings (overrides `cores`).
        info: if given, filled with `cached`, `device`, `fingerprint`, `matrices`.
        cached_only: return the cached table, or None instead of computing it.
        ray: `auto` or a cluster address: compute the matrices as Ray tasks, one per
            matrix, each reading its own tensor (spectra.linalg.cluster); the same
            table, under the same cache key, as the local path's.
    """
    info = {} if info is None else info
    settings = settings or AnalysisSettings(cores=cores, mpo=with_mpo)
    source, mats, device = model.source, model.matrices, model.device
    if ray is not None:
        run = functools.partial(_run_ray, ray)
    else:
        run = _run_cuda if device.startswith("cuda") else _run_cpu
    stamps = {f: cache.file_stamp(f) for f in source.files}
    hashes = _known_hashes(stamps) if use_cache else None
    if cached_only and hashes is None:
        return None  # these files were never analysed
    rows_by_name = None
    if hashes is None and (run is _run_cpu or ray is not None):
        # first sight of these files: hash each tensor from the bytes read for the analysis
        hashes = {}
        rows_by_name = dict(
            zip([m.name for m in mats], run(mats, settings, device, progress, hashes), strict=True)
        )
        if use_cache:
            for f in source.files:
                cache.store_hashes(
                    f, stamps[f], {m.ref.name: hashes[m.ref.name] for m in mats if m.ref.path == f}
                )
    elif hashes is None:
        hashes = {}
        for f in source.files:
            hashes.update(cache.file_tensor_hashes(f, [m.ref for m in mats if m.ref.path == f]))
    unique, aliases = dedupe(mats, hashes)
    path = table_path(unique, hashes, settings)
    names = [m.name for m in unique]
    where = f"ray {ray}" if ray is not None else device
    info.update(cached=False, device=where, fingerprint=path.stem, matrices=len(names))
    if use_cache and rows_by_name is None:
        hit = _read_table(path, names)
        if hit is not None:
            info.update(cached=True, device="cache")
            return hit
    if cached_only:
        return None
    if rows_by_name is None:
        # rows a background analysis (spectra.background) already stored are read
        rows_by_name = _stored_rows(unique, hashes, settings) if use_cache else {}
        todo = [m for m in unique if m.name not in rows_by_name]
        if todo:
            got = run(todo, settings, device, progress)
            rows_by_name.update(zip([m.name for m in todo], got, strict=True))
    return table(unique, rows_by_name, hashes, aliases, path if use_cache else None)


def table_path(unique: list[Matrix], hashes: dict, settings: AnalysisSettings):
    """Where the table of these (deduplicated) matrices under `settings` is cached."""
    fingerprint = cache.key(
        cache.CACHE_VERSION,
        asdict(settings),
        [(m.name, hashes[m.ref.name], m.transposed, m.role) for m in unique],
    )
    return cache.cache_dir() / "analysis" / f"{fingerprint}.parquet"


def table(unique, rows_by_name: dict, hashes: dict, aliases: dict, path=None):
    """The analysis table of `unique` from their rows; written to `path` if given."""
    rows = [
        dict(rows_by_name[m.name], **identity(m, hashes[m.ref.name]), aliases=aliases[m.name])
        for m in unique
    ]
    df = frame(rows)
    if path is not None:
        with cache.atomic_path(path) as tmp:
            df.write_parquet(tmp)
    return df


def identity(m: Matrix, content_hash: str | None) -> dict:
    """The columns of a row that say which matrix it is."""
    return dict(
        name=m.name,
        role=m.role,
        block=m.block,
        shape_m=m.shape[0],
        shape_n=m.shape[1],
        dtype=m.ref.dtype,
        content_hash=content_hash,
    )


def frame(rows: list[dict]):
    """Rows (with their identity columns) as the analysis table, in its order."""
    import polars as pl

    df = pl.DataFrame(rows, schema=rowlib.schema(), strict=False).select(list(rowlib.schema()))
    return df.sort(by=_order_key(df))


def _stored_rows(unique, hashes, settings) -> dict[str, dict]:
    found = {}
    for m in unique:
        row = rowlib.read_row(rowlib.row_path(m, hashes[m.ref.name], settings), settings)
        if row is not None:
            found[m.name] = row
    return found


def _known_hashes(stamps) -> dict[str, str] | None:
    """Memoised hashes of every file's tensors, or None if any file is new or changed."""
    hashes: dict[str, str] = {}
    for f, stamp in stamps.items():
        memo = cache.memoized_hashes(f, stamp)
        if memo is None:
            return None
        hashes.update(memo)
    return hashes


def dedupe(mats, hashes):
    """Keep one matrix per content hash (not the lm_head); tied copies become aliases."""
    first: dict[tuple, Matrix] = {}
    aliases: dict[str, list[str]] = {}
    for m in sorted(mats, key=lambda m: m.role == "lm_head"):
        k = (hashes[m.ref.name], m.shape)
        if k in first:
            aliases[first[k].name].append(m.name)
        else:
            first[k] = m
            aliases[m.name] = []
    return list(first.values()), aliases


def _order_key(df):
    import polars as pl

    group = pl.when(pl.col("role") == "embed").then(0).when(pl.col("role") == "lm_head").then(2)
    role_idx = pl.col("role").replace_strict({r: i for i, r in enumerate(ROLES)}, default=99)
    return [group.otherwise(1), pl.col("block").fill_null(-1), role_idx, pl.col("name")]


def _read_table(path, names):
    """A cached table, or None if it is missing, unreadable or not for these matrices."""
    import polars as pl

    if not path.is_file():
        return None
    try:
        df = pl.read_parquet(path)
    except Exception:  # truncated or garbage file: recompute
        return None
    if set(df.columns) != set(rowlib.schema()) or sorted(df["name"].to_list()) != sorted(names):
        return None
    return df


def _run_cpu(mats, settings, device, progress, hashes=None):
    """Rows for `mats` from a thread pool; fills `hashes` (name -> content hash) if given."""
    from threadpoolctl import threadpool_limits

    scratch.tune_allocator()
    order = sorted(range(len(mats)), key=lambda i: -math.prod(mats[i].shape))
    rows: list[dict | None] = [None] * len(mats)
    workers = rowlib.workers()

    def work(i):
        rows[i] = rowlib.cpu_row(mats[i], settings, hashes)
        return i

    # one BLAS thread per worker: LAPACK's eigensolver scales poorly across threads
    with threadpool_limits(1, user_api="blas"), ThreadPoolExecutor(workers) as pool:
        for done, i in enumerate(pool.map(work, order), 1):
            if progress:
                progress(done, len(mats), mats[i].name)
    return rows


def matrix_task(job: tuple) -> tuple[dict, dict]:
    """(row, {tensor: content hash}) of one matrix: a Ray task's whole work.

    `job` is (matrix, settings, device): the task reads its own tensor, on `cuda`
    through the GPU path's code, else through the CPU pool's.
    """
    m, settings, device = job
    hashes: dict = {}
    if device.startswith("cuda"):
        w = m.read_scratch(hashes)
        return _cuda_rows([w], settings, device)[0], hashes
    scratch.tune_allocator()
    return rowlib.cpu_row(m, settings, hashes), hashes


def _run_ray(address, mats, settings, device, progress, hashes=None):
    """Rows for `mats` as Ray tasks (largest first); fills `hashes` if given.

    The matrices wait in one queue, largest first. When this call starts a local
    cluster on this machine's CPUs, this process's own thread pool works through the
    queue from the start (the cluster takes about 4 s to come up) and keeps doing so
    beside the cluster's tasks, which draw from the same queue one slot at a time
    (so neither side waits on the other's leftovers). A cluster that is already
    running, or at an address, gets every matrix.
    """
    from threadpoolctl import threadpool_limits

    from spectra.linalg import cluster

    order = sorted(range(len(mats)), key=lambda i: -math.prod(mats[i].shape))
    rows: list[dict | None] = [None] * len(mats)
    queue = collections.deque(order)
    lock = threading.Lock()
    done = [0]

    def take() -> int | None:
        with lock:
            return queue.popleft() if queue else None

    def finished(i):
        with lock:
            done[0] += 1
            if progress:
                progress(done[0], len(mats), mats[i].name)

    def local_worker():
        while (i := take()) is not None:
            rows[i] = rowlib.cpu_row(mats[i], settings, hashes)
            finished(i)

    overlap = cluster.starts_local(address) and device == "cpu"
    workers = rowlib.workers() if overlap else 0
    if overlap:
        scratch.tune_allocator()
    with threadpool_limits(1, user_api="blas"), ThreadPoolExecutor(max(workers, 1)) as pool:
        local = [pool.submit(local_worker) for _ in range(workers)]
        info = cluster.connect(address)
        try:
            if device.startswith("cuda") and not info["gpus"]:
                raise SpectraInputError(f"--device {device}: the Ray cluster has no GPUs")
            task_device = "cuda" if device != "cpu" and info["gpus"] else "cpu"
            width = info["gpus"] if task_device == "cuda" else info["cpus"]

            def job():
                i = take()
                return None if i is None else (i, (mats[i], settings, task_device))

            for i, (row, got) in cluster.task_pull(
                matrix_task,
                job,
                names=lambda j: j[0].name,
                num_gpus=1 if task_device == "cuda" else 0,
                width=max(1, width),
            ):
                rows[i] = row
                if hashes is not None:
                    hashes.update(got)
                finished(i)
            for f in local:
                f.result()
        finally:
            with lock:
                queue.clear()  # a failure stops the local workers too
            cluster.disconnect(info)
    return rows


def _run_cuda(mats, settings, device, progress):
    """Batched by shape on the GPU: spectra and bond spectra; metrics on the CPU."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, m in enumerate(mats):
        groups.setdefault(m.shape, []).append(i)
    rows: list[dict | None] = [None] * len(mats)
    done = 0
    for (mm, nn), idx in groups.items():
        per_batch = max(1, GPU_BATCH_BYTES // (mm * nn * 8))
        for lo in range(0, len(idx), per_batch):
            chunk = idx[lo : lo + per_batch]
            batch = _cuda_rows([mats[i].read() for i in chunk], settings, device)
            for i, row in zip(chunk, batch, strict=True):
                rows[i] = row
                done += 1
                if progress:
                    progress(done, len(mats), mats[i].name)
    return rows


def _cuda_rows(arrays: list[np.ndarray], settings, device) -> list[dict]:
    """Rows of equal-shape (m, n) matrices, their SVDs batched on `device`."""
    import torch

    mm, nn = arrays[0].shape
    mf, nf = mpo.factorize(mm, settings.cores), mpo.factorize(nn, settings.cores)
    w = torch.stack([torch.from_numpy(np.ascontiguousarray(a)) for a in arrays])
    w = w.to(device, torch.float64)
    s = singular_values_torch(w).cpu().numpy()
    bonds = (
        [
            singular_values_torch(mpo.unfolding(w, mf, nf, k)).cpu().numpy()
            for k in range(settings.cores - 1)
        ]
        if settings.mpo
        else None
    )
    del w
    return [
        rowlib.row_of(s[j], [x[j] for x in bonds] if bonds is not None else None, mf, nf, settings)
        for j in range(len(arrays))
    ]


def spectra_by_name(model: Model, use_cache: bool = True) -> dict[str, list[float]]:
    """Every matrix's singular values: from the cached default analysis when there is
    one (the app's and `spectra analyze`'s), else from a spectra-only analysis."""
    df = analyze(model, cached_only=True) if use_cache else None
    if df is None:
        df = analyze(model, with_mpo=False, use_cache=use_cache)
    return {r["name"]: r["sigma"] for r in df.select("name", "sigma").to_dicts()}
