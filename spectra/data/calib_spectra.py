"""Activation-aware spectra: the singular values of W L with L L^T = H = X^T X.

For the best rank-k approximation in the calibration-weighted norm (whitened low
rank, SVD-LLM), ||(W - W_k) X^T||_F^2 = sum_{i>k} s_i^2 of these values, exactly as
the weight spectrum's tail is the Frobenius error of the plain truncation. So this
spectrum is to data-aware compression what the weight spectrum is to data-free
compression: its metrics (the activation-aware ones of `spectra.linalg.metrics.METRICS`:
`calib_erank`, `calib_energy_rank_90`, ...) say how compressible a module is on the
inputs it really sees. L is the whitening factor every `whiten: true` method uses
(Cholesky with the jitter fallback), so the curve is what `lowrank whiten: true` reaches.

The table is cached beside the calibration it was computed from
(cache/calibration/<key>/spectra.parquet): that key already holds the weights'
fingerprint and the calibration windows.
"""

from __future__ import annotations

import numpy as np

from compressors.base import Calibration, whitening_factor
from spectra.data import calibration
from spectra.io import cache
from spectra.io.model import Model
from spectra.linalg import metrics
from spectra.linalg.parallel import parallel_map

SPECTRA_FILE = "spectra.parquet"
COLUMNS = ("calib_sigma", *(n for n, m in metrics.METRICS.items() if m.aware))


def activation_spectrum(weight, hessian, device: str = "cpu") -> np.ndarray:
    """Descending singular values of W L (float64), W (out, in), H (in, in)."""
    import torch

    chol = whitening_factor("analyze", Calibration(torch.as_tensor(hessian), 0))
    w = torch.as_tensor(np.asarray(weight)).to(torch.float64)
    return torch.linalg.svdvals(w.to(device) @ chol.to(device)).cpu().numpy()


def calib_table(
    model: Model,
    settings: calibration.CalibrationSpec | None = None,
    *,
    use_cache: bool = True,
    progress=None,
    info: dict | None = None,
):
    """One row per linear module inside a transformer block: `name` and COLUMNS.

    Reads (or computes) the calibration of `model` first (on its device); `info` gets its `cached`,
    `path`, `tokens` and whether the spectra came from the cache (`spectra_cached`).
    """
    import polars as pl

    info = {} if info is None else info
    grams = calibration.calibrate(model, settings, use_cache=use_cache, info=info)
    path = grams.folder / SPECTRA_FILE
    if use_cache and path.is_file():
        try:
            df = pl.read_parquet(path)
            if list(df.columns) == ["name", *COLUMNS]:
                info.update(spectra_cached=True)
                return df
        except Exception:  # a truncated or garbage file: recomputed
            pass
    info.update(spectra_cached=False)
    device = model.device
    jobs = []
    for block in grams.blocks:
        for name, (h, _) in grams[block].items():
            jobs.append((name, model.matrix(name), h))

    def work(job):
        name, m, h = job
        s = activation_spectrum(m.read(), h, device)
        return {"name": name, "calib_sigma": s.tolist(), **metrics.spectrum_metrics(s, aware=True)}

    rows = []
    # one module per core on the CPU; on a GPU one at a time is already fast
    run = parallel_map(work, jobs) if device == "cpu" else map(work, jobs)
    for done, row in enumerate(run, 1):
        rows.append(row)
        if progress:
            progress(done, len(jobs), row["name"])
    df = pl.DataFrame(rows, schema=_schema())
    if use_cache:
        with cache.atomic_path(path) as tmp:
            df.write_parquet(tmp)
    return df


def _schema():
    import polars as pl

    return {
        "name": pl.String,
        "calib_sigma": pl.List(pl.Float64),
        **metrics.schema(aware=True),
    }
