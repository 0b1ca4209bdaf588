"""One matrix's analysis row (spectrum, metrics, MPO bond profile) and its own cache.

`analyze` (spectra.analysis) builds its table from these rows; a background analysis
(spectra.background) stores each row as it finishes, keyed by the matrix's content
hash, the settings and CACHE_VERSION, so an interrupted one resumes where it stopped
and a later `analyze` reads what is there instead of computing it again.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from spectra.io import cache
from spectra.io.model import Matrix
from spectra.io.tensors import iter_row_chunks
from spectra.linalg import metrics, mpo
from spectra.linalg.svd import singular_values, singular_values_streamed

# without MPO profiles, tall matrices above this float64 size (embeddings, lm_heads) are
# never held whole: their Gram is accumulated from row blocks of STREAM_CHUNK_BYTES
STREAM_MIN_BYTES = 32 * 2**20
STREAM_CHUNK_BYTES = 8 * 2**20
MPO_KEYS = (
    "mpo_cores",
    "mpo_m",
    "mpo_n",
    "bond_dims",
    "bond_entropy",
    "bond_spectra",
    "mpo_eps",
    "bond_chi",
    "mpo_params_full",
    "mpo_ratio",
    "mpo_chi_for_ratio",
)


@dataclass(frozen=True)
class AnalysisSettings:
    """What an analysis computes; part of the cache key.

    Attributes:
        cores: number of MPO cores K (2..6).
        mpo: compute the MPO bond profiles (False leaves those columns null).
        mpo_eps: relative error at which `bond_chi` (chi(eps) per bond) is reported.
        mpo_ratio: parameter ratio at which `mpo_chi_for_ratio` is reported.
    """

    cores: int = 3
    mpo: bool = True
    mpo_eps: float = 0.1
    mpo_ratio: float = 0.5

    def __post_init__(self):
        mpo.check_cores(self.cores)
        if not 0 < self.mpo_eps < 1:
            raise ValueError(f"mpo_eps={self.mpo_eps}: must be in (0, 1)")
        if not 0 < self.mpo_ratio <= 1:
            raise ValueError(f"mpo_ratio={self.mpo_ratio}: must be in (0, 1]")


def workers() -> int:
    """Threads of the CPU analysis (one BLAS thread each): every core, at most 8."""
    return max(1, min(os.cpu_count() or 1, 8))


def matrix_row(w: np.ndarray, settings: AnalysisSettings, s: np.ndarray | None = None) -> dict:
    """Spectrum, metrics and MPO profile of one (m, n) matrix (numpy, CPU); `s`: its
    singular values when they are known already."""
    s = singular_values(w) if s is None else s
    if not settings.mpo:
        return row_of(s, None, None, None, settings)
    mf, nf = (mpo.factorize(d, settings.cores) for d in w.shape)
    return row_of(s, mpo.bond_spectra(w, mf, nf), mf, nf, settings)


def row_of(s, bonds, mf, nf, settings) -> dict:
    """The row of a spectrum `s` and, when `bonds` is given, its MPO bond spectra."""
    row = metrics.spectrum_metrics(s)
    row.update(sigma=s.tolist())
    if bonds is None:
        return row
    row.update(
        mpo_cores=len(mf),
        mpo_m=list(mf),
        mpo_n=list(nf),
        bond_dims=mpo.full_bond_dims(mf, nf),
        bond_entropy=[mpo.entropy(b) for b in bonds],
        bond_spectra=[b.tolist() for b in bonds],
        mpo_eps=settings.mpo_eps,
        bond_chi=mpo.chi_for_eps(bonds, settings.mpo_eps),
        mpo_params_full=mpo.mpo_params(mf, nf, mpo.full_bond_dims(mf, nf)),
        mpo_ratio=settings.mpo_ratio,
        mpo_chi_for_ratio=mpo.chi_for_ratio(mf, nf, settings.mpo_ratio),
    )
    return row


def cpu_row(m: Matrix, settings: AnalysisSettings, hashes: dict | None) -> dict:
    """One matrix's row, read from its checkpoint (streamed when tall, large, no MPO);
    fills `hashes` (tensor -> content hash of the bytes read) if given."""
    if streams(m, settings):
        chunk = max(1, STREAM_CHUNK_BYTES // (8 * m.ref.shape[1]))
        s = singular_values_streamed(iter_row_chunks(m.ref, chunk, hashes))
        if s is not None:
            return row_of(s, None, None, None, settings)
    return matrix_row(m.read_scratch(hashes), settings)


def streams(m: Matrix, settings: AnalysisSettings) -> bool:
    """Tall (as stored) and large, without MPO: its Gram is accumulated from row blocks
    read in turn."""
    a, b = m.ref.shape
    return not settings.mpo and a >= b and a * b * 8 >= STREAM_MIN_BYTES


def schema():
    """The analysis table's columns and types (name first, as `analyze` returns them)."""
    import polars as pl

    f64, i64, f64s, i64s = pl.Float64, pl.Int64, pl.List(pl.Float64), pl.List(pl.Int64)
    return {
        "name": pl.String,
        "role": pl.String,
        "block": i64,
        "shape_m": i64,
        "shape_n": i64,
        "dtype": pl.String,
        "content_hash": pl.String,
        "aliases": pl.List(pl.String),
        **metrics.schema(),  # every weight metric, one column each
        "sigma": f64s,
        "mpo_cores": i64,
        "mpo_m": i64s,
        "mpo_n": i64s,
        "bond_dims": i64s,
        "bond_entropy": f64s,
        "bond_spectra": pl.List(f64s),
        "mpo_eps": f64,
        "bond_chi": i64s,
        "mpo_params_full": i64,
        "mpo_ratio": f64,
        "mpo_chi_for_ratio": i64,
    }


def row_path(m: Matrix, content_hash: str, settings: AnalysisSettings) -> Path:
    """Where one matrix's row is cached: its content, how it is read, the settings."""
    k = cache.key(
        cache.CACHE_VERSION,
        "row",
        asdict(settings),
        content_hash,
        m.ref.dtype,
        list(m.ref.shape),
        m.transposed,
    )
    return cache.cache_dir() / "rows" / k[:2] / f"{k}.json"


def read_row(path: Path, settings: AnalysisSettings) -> dict | None:
    """A cached row, or None when it is missing, unreadable or not of these settings."""
    row = cache.read_json(path)
    want = set(metrics.schema()) | {"sigma"} | (set(MPO_KEYS) if settings.mpo else set())
    if not isinstance(row, dict) or set(row) != want or not isinstance(row["sigma"], list):
        return None
    return row


def write_row(path: Path, row: dict) -> None:
    """Store a row (atomically: a reader never sees half of it)."""
    with cache.atomic_path(path) as tmp:
        tmp.write_text(json.dumps(row))
