"""Per-matrix metrics computed from a singular value spectrum.

Definitions follow DESIGN.md (Analysis). `alpha` is the Clauset-Shalizi-Newman
continuous power-law MLE on the eigenvalue (sigma^2) tail with xmin chosen by the
Kolmogorov-Smirnov distance, as WeightWatcher's default fit does: eigenvalues
<= 1e-5 are dropped, every distinct eigenvalue but the largest is tried as xmin,
and candidates with alpha <= 1 are rejected.
"""

from __future__ import annotations

import numpy as np

from compressors.spectrum import energy_rank, rank_error_curve
from spectra.linalg import scratch

__all__ = ["energy_rank", "powerlaw_fit", "rank_error_curve", "spectrum_metrics"]

EVALS_THRESH = 1e-5  # WeightWatcher's EVALS_THRESH, for comparable alphas


def spectrum_metrics(s: np.ndarray) -> dict[str, float | int]:
    """Every scalar metric of a descending float64 spectrum `s`."""
    s = np.asarray(s, dtype=np.float64)
    s2 = s * s
    fro2 = float(s2.sum())
    smax = float(s[0]) if s.size else 0.0
    if smax == 0.0:
        nan = float("nan")
        return dict(
            sigma_max=0.0,
            fro_norm=0.0,
            nuclear_norm=0.0,
            stable_rank=nan,
            erank=nan,
            energy_rank_90=0,
            energy_rank_99=0,
            participation_ratio=nan,
            alpha=nan,
            alpha_xmin=nan,
            alpha_ks=nan,
            alpha_n=0,
        )
    p = s / s.sum()
    p = p[p > 0]
    alpha, xmin, ks, n_tail = powerlaw_fit(s2)
    return dict(
        sigma_max=smax,
        fro_norm=float(np.sqrt(fro2)),
        nuclear_norm=float(s.sum()),
        stable_rank=fro2 / smax**2,
        erank=float(np.exp(-(p * np.log(p)).sum())),
        energy_rank_90=energy_rank(s, 0.90),
        energy_rank_99=energy_rank(s, 0.99),
        participation_ratio=fro2**2 / float((s2 * s2).sum()),
        alpha=alpha,
        alpha_xmin=xmin,
        alpha_ks=ks,
        alpha_n=n_tail,
    )


def powerlaw_fit(
    evals: np.ndarray, thresh: float = EVALS_THRESH
) -> tuple[float, float, float, int]:
    """(alpha, xmin, KS distance, tail size) of the eigenvalue tail; NaNs when too few values.

    Vectorised over all xmin candidates: O(N^2) work in a handful of array passes.
    """
    x = np.sort(np.asarray(evals, dtype=np.float64))
    x = x[x > thresh]
    big = x.size
    if big < 3:
        return float("nan"), float("nan"), float("nan"), 0
    logx = np.log(x)
    idx = np.arange(big - 1)  # candidate xmin positions
    n = (big - idx).astype(np.float64)  # tail sizes
    tail_log = np.cumsum(logx[::-1])[::-1][:-1]
    denom = tail_log - n * logx[:-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        alphas = 1.0 + n / denom
    ok = np.isfinite(alphas) & (alphas > 1.0)
    # dist[i, j] = |theoretical CDF - empirical CDF| at x_j for xmin = x_i, j >= i. Rows go
    # in blocks that skip the columns left of the block (all zero there), in place in
    # scratch buffers: fresh (N, N) arrays page-fault more time than the arithmetic.
    one_minus_a = 1.0 - np.where(ok, alphas, 2.0)
    ks = np.empty(big - 1)
    block = 64
    cdf_buf = scratch.buffer("ks_cdf", block * big)
    emp_buf = scratch.buffer("ks_emp", block * big)
    for lo in range(0, big - 1, block):
        hi = min(lo + block, big - 1)
        shape = (hi - lo, big - lo)
        cdf = cdf_buf[: shape[0] * shape[1]].reshape(shape)
        emp = emp_buf[: shape[0] * shape[1]].reshape(shape)
        np.subtract(logx[None, lo:], logx[lo:hi, None], out=cdf)  # log(x_j / xmin_i)
        np.maximum(cdf, 0.0, out=cdf)  # left of the diagonal both CDFs are 0
        np.multiply(cdf, one_minus_a[lo:hi, None], out=cdf)
        np.maximum(cdf, -60.0, out=cdf)  # exp(-60) = 1e-26: invisible in a KS distance
        np.exp(cdf, out=cdf)  # = 1 - theoretical CDF
        np.subtract(np.arange(lo, big)[None, :], idx[lo:hi, None], out=emp)
        np.maximum(emp, 0.0, out=emp)
        np.divide(emp, n[lo:hi, None], out=emp)
        np.add(cdf, emp, out=cdf)
        np.subtract(1.0, cdf, out=cdf)
        np.abs(cdf, out=cdf)
        ks[lo:hi] = cdf.max(axis=1)
    ks = np.where(ok, ks, 1.0)
    best = int(np.argmin(ks))
    return float(alphas[best]), float(x[best]), float(ks[best]), int(n[best])
