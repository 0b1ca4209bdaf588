"""Per-matrix metrics computed from a singular value spectrum, and their one table.

`METRICS` holds every metric once: its column name, label, formula, kind (of the
weights, or activation-aware: of W L with L L^T = X^T X, the `calib_*` columns) and
how to compute it. The analysis schema, `spectra analyze`'s summary, the app's heatmap
and the docs (docs/gen/metrics_ref.py) read it.

Definitions follow DESIGN.md (Analysis). `alpha` is the Clauset-Shalizi-Newman
continuous power-law MLE on the eigenvalue (sigma^2) tail with xmin chosen by the
Kolmogorov-Smirnov distance, as WeightWatcher's default fit does: eigenvalues
<= 1e-5 are dropped, every distinct eigenvalue but the largest is tried as xmin,
and candidates with alpha <= 1 are rejected.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import cached_property

import numpy as np

from spectra.linalg import scratch

__all__ = [
    "HEATMAP",
    "METRICS",
    "SUMMARY",
    "Metric",
    "Spectrum",
    "energy_rank",
    "powerlaw_fit",
    "rank_error_curve",
    "schema",
    "spectrum_metrics",
]

EVALS_THRESH = 1e-5  # WeightWatcher's EVALS_THRESH, for comparable alphas
NAN = float("nan")


def energy_rank(s: np.ndarray, q: float) -> int:
    """Smallest k with sum_{i<=k} sigma_i^2 >= q * ||W||_F^2 (1e-12 relative slack)."""
    cum = np.cumsum(np.asarray(s, dtype=np.float64) ** 2)
    return int(np.searchsorted(cum, q * cum[-1] * (1 - 1e-12), side="left") + 1)


def rank_error_curve(s: np.ndarray) -> np.ndarray:
    """err[k] = ||W - W_k||_F / ||W||_F for the best rank-k approximation, k = 0..len(s)."""
    s2 = np.asarray(s, dtype=np.float64) ** 2
    tail = np.concatenate([np.cumsum(s2[::-1])[::-1], [0.0]])
    return np.sqrt(np.clip(tail / tail[0], 0.0, None)) if tail[0] > 0 else np.zeros_like(tail)


class Spectrum:
    """A descending float64 spectrum and the sums and fit its metrics share, each
    computed once (on first use)."""

    def __init__(self, s: np.ndarray):
        self.s = np.asarray(s, dtype=np.float64)

    @cached_property
    def s2(self) -> np.ndarray:
        return self.s * self.s

    @cached_property
    def fro2(self) -> float:
        return float(self.s2.sum())

    @cached_property
    def smax(self) -> float:
        return float(self.s[0]) if self.s.size else 0.0

    @cached_property
    def p(self) -> np.ndarray:
        """sigma_i / sum sigma, zeros dropped."""
        p = self.s / self.s.sum()
        return p[p > 0]

    @cached_property
    def fit(self) -> tuple[float, float, float, int]:
        """powerlaw_fit of the eigenvalues sigma^2."""
        return powerlaw_fit(self.s2)


@dataclass(frozen=True)
class Metric:
    """One per-matrix metric: a column of the analysis table.

    Attributes:
        name: the column name.
        label: a short label for menus, chart titles and the docs.
        formula: its definition, as the docs print it.
        compute: its value from a `Spectrum` with a nonzero largest singular value.
        dtype: `float` or `int`, the column's type.
        zero: its value for an all-zero matrix.
        aware: activation-aware: computed from the singular values of W L (L L^T = X^T X
            of the module's calibration inputs), not of W (`spectra analyze --calib`).
        of: for an activation-aware metric, the weight metric it is of W L.
    """

    name: str
    label: str
    formula: str
    compute: Callable[[Spectrum], float | int]
    dtype: type = float
    zero: float | int = NAN
    aware: bool = False
    of: str | None = None


def _of_w_l(m: Metric) -> Metric:
    """The activation-aware metric `calib_<name>`: `m` of the spectrum of W L."""
    return replace(
        m,
        name=f"calib_{m.name}",
        label=f"activation-aware {m.label}",
        formula=f"`{m.name}` of the singular values of W L (L L^T = X^T X)",
        aware=True,
        of=m.name,
    )


_WEIGHT = [
    Metric("sigma_max", "sigma max", "largest singular value", lambda x: x.smax, zero=0.0),
    Metric(
        "fro_norm",
        "Frobenius norm",
        "sqrt(sum sigma_i^2)",
        lambda x: float(np.sqrt(x.fro2)),
        zero=0.0,
    ),
    Metric("nuclear_norm", "nuclear norm", "sum sigma_i", lambda x: float(x.s.sum()), zero=0.0),
    Metric("stable_rank", "stable rank", "fro_norm^2 / sigma_max^2", lambda x: x.fro2 / x.smax**2),
    Metric(
        "erank",
        "effective rank",
        "exp(-sum p_i log p_i), p_i = sigma_i / sum sigma (Roy & Vetterli 2007)",
        lambda x: float(np.exp(-(x.p * np.log(x.p)).sum())),
    ),
    Metric(
        "energy_rank_90",
        "energy rank 90%",
        "smallest k with sum_{i<=k} sigma_i^2 >= 0.90 fro_norm^2",
        lambda x: energy_rank(x.s, 0.90),
        int,
        0,
    ),
    Metric(
        "energy_rank_99",
        "energy rank 99%",
        "smallest k with sum_{i<=k} sigma_i^2 >= 0.99 fro_norm^2",
        lambda x: energy_rank(x.s, 0.99),
        int,
        0,
    ),
    Metric(
        "participation_ratio",
        "participation ratio",
        "(sum sigma^2)^2 / sum sigma^4",
        lambda x: x.fro2**2 / float((x.s2 * x.s2).sum()),
    ),
    Metric(
        "alpha",
        "power-law alpha",
        "exponent of the power-law fit of the eigenvalue (sigma^2) tail: Clauset-Shalizi-"
        "Newman MLE, xmin by the KS distance (WeightWatcher's alpha)",
        lambda x: x.fit[0],
    ),
    Metric("alpha_xmin", "alpha xmin", "the fit's xmin (an eigenvalue)", lambda x: x.fit[1]),
    Metric("alpha_ks", "alpha KS distance", "the fit's KS distance", lambda x: x.fit[2]),
    Metric(
        "alpha_n", "alpha tail size", "eigenvalues >= xmin in the fit", lambda x: x.fit[3], int, 0
    ),
]
_AWARE = ("erank", "stable_rank", "energy_rank_90", "energy_rank_99")  # their calib_* order

METRICS: dict[str, Metric] = {m.name: m for m in _WEIGHT}
METRICS.update({f"calib_{n}": _of_w_l(METRICS[n]) for n in _AWARE})
"""Every per-matrix metric by column name, in the analysis table's column order."""

# selections of METRICS, in the order they are shown
SUMMARY = ("erank", "stable_rank", "energy_rank_90", "alpha", "calib_erank", "calib_energy_rank_90")
"""`spectra analyze`'s summary by role and by block (a calib_* one only with --calib)."""
HEATMAP = ("erank", "stable_rank", "energy_rank_90", "energy_rank_99", "alpha", "sigma_max")
"""The app's heatmap menu (with activation-aware spectra: those with a calib_* metric)."""


def spectrum_metrics(s: np.ndarray, aware: bool = False) -> dict[str, float | int]:
    """Every weight metric (`aware`: every activation-aware one) of a descending float64
    spectrum `s` (for `aware`, the spectrum of W L), by column name."""
    x = Spectrum(s)
    chosen = [m for m in METRICS.values() if m.aware == aware]
    if x.smax == 0.0:
        return {m.name: m.zero for m in chosen}
    return {m.name: m.compute(x) for m in chosen}


def schema(aware: bool = False) -> dict:
    """Polars column types of the weight (`aware`: activation-aware) metrics."""
    import polars as pl

    types = {float: pl.Float64, int: pl.Int64}
    return {m.name: types[m.dtype] for m in METRICS.values() if m.aware == aware}


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
