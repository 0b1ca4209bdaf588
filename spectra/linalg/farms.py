"""FARMS: the power-law alpha of a matrix measured on fixed-aspect-ratio submatrices.

A matrix's eigenvalue spectrum (of W^T W) has a shape that depends on its aspect
ratio (Marchenko-Pastur), so plain `alpha` drifts with the shape of W and compares
badly between a square attention projection and a 3:1 MLP matrix. FARMS (Fixed-Aspect-
Ratio Matrix Subsampling; Hu et al., "Eigenspectrum analysis of neural networks
without aspect ratio bias", ICML 2025) measures alpha on square b x b submatrices
instead: W is cut into the grid of non-overlapping b x b tiles from its top-left
corner (b = min(TILE, m, n); leftover rows and columns are not read), up to
`max_tiles` of them are drawn with a fixed seed, the eigenvalues of every drawn tile
(its squared singular values) are pooled into one empirical spectrum (the average of
the tiles' spectral densities) and the Clauset-Shalizi-Newman fit of
`spectra.linalg.metrics.powerlaw_fit` is run on that pool. A matrix smaller than one
TILE x TILE gets one square tile of its shorter side.

`farms_table(spec)` gives one row per analysed matrix (`farms_alpha`, `farms_xmin`,
`farms_ks`, `farms_n`), cached beside the analysis tables
(`cache/analysis/farms-<key>.parquet`), keyed by the matrices' content hashes (from
the analysis table), the FARMS settings and FARMS_VERSION.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from spectra.linalg.metrics import powerlaw_fit

FARMS_VERSION = 1
TILE = 128
MAX_TILES = 16
COLUMNS = ("farms_alpha", "farms_xmin", "farms_ks", "farms_n")


@dataclass(frozen=True)
class FarmsSettings:
    """How submatrices are drawn; part of the cache key.

    Attributes:
        tile: side b of the square submatrices (b = min(tile, m, n)).
        max_tiles: at most this many tiles per matrix, drawn with `seed`.
        seed: which tiles are drawn when a matrix has more than `max_tiles`.
    """

    tile: int = TILE
    max_tiles: int = MAX_TILES
    seed: int = 0

    def __post_init__(self):
        if self.tile < 2 or self.max_tiles < 1:
            raise ValueError(f"FARMS tile={self.tile}, max_tiles={self.max_tiles}: too small")


def tile_positions(m: int, n: int, settings: FarmsSettings = FarmsSettings()):
    """(b, [(row, col) tile indices]) of the tiles drawn from an (m, n) matrix."""
    b = min(settings.tile, m, n)
    pos = [(i, j) for i in range(m // b) for j in range(n // b)]
    if len(pos) > settings.max_tiles:
        rng = np.random.default_rng(settings.seed)
        pick = sorted(rng.choice(len(pos), settings.max_tiles, replace=False))
        pos = [pos[k] for k in pick]
    return b, pos


def farms_eigenvalues(w, settings: FarmsSettings = FarmsSettings()) -> np.ndarray:
    """The pooled eigenvalues (squared singular values) of the drawn tiles of `w`."""
    w = np.asarray(w, dtype=np.float64)
    b, pos = tile_positions(*w.shape, settings)
    tiles = np.stack([w[i * b : (i + 1) * b, j * b : (j + 1) * b] for i, j in pos])
    return (np.linalg.svd(tiles, compute_uv=False) ** 2).ravel()  # (tiles * b,)


def farms_alpha(w, settings: FarmsSettings = FarmsSettings()) -> dict:
    """FARMS `farms_alpha`, `farms_xmin`, `farms_ks`, `farms_n` of one matrix (NaN
    alpha when the pooled spectrum has too few eigenvalues for a fit)."""
    alpha, xmin, ks, n = powerlaw_fit(farms_eigenvalues(w, settings))
    return dict(farms_alpha=alpha, farms_xmin=xmin, farms_ks=ks, farms_n=n)


def farms_table(
    model, settings: FarmsSettings = FarmsSettings(), use_cache: bool = True, progress=None
):
    """One row per analysed matrix of `model` (spectra.io.model.Model): `name` and
    COLUMNS (polars), cached."""
    import polars as pl

    from spectra.analysis import analyze
    from spectra.io import cache
    from spectra.linalg.parallel import parallel_map

    df = analyze(model, cached_only=True) if use_cache else None
    if df is None:
        df = analyze(model, with_mpo=False, use_cache=use_cache)
    pairs = df.select("name", "content_hash").rows()
    key = cache.key("farms", FARMS_VERSION, asdict(settings), sorted(pairs))
    path = cache.cache_dir() / "analysis" / f"farms-{key}.parquet"
    if use_cache and path.is_file():
        try:
            hit = pl.read_parquet(path)
            if hit.columns == ["name", *COLUMNS] and hit.height == len(pairs):
                return hit
        except Exception:  # a truncated or garbage file: recomputed
            pass
    names = [name for name, _ in pairs]

    def work(name):
        return {"name": name, **farms_alpha(model.matrix(name).read(), settings)}

    rows = []
    for done, row in enumerate(parallel_map(work, names), 1):
        rows.append(row)
        if progress:
            progress(done, len(names), f"FARMS {row['name']}")
    out = pl.DataFrame(rows, schema=_schema())
    if use_cache:
        with cache.atomic_path(path) as tmp:
            out.write_parquet(tmp)
    return out


def _schema():
    import polars as pl

    f64 = pl.Float64
    return {
        "name": pl.String,
        "farms_alpha": f64,
        "farms_xmin": f64,
        "farms_ks": f64,
        "farms_n": pl.Int64,
    }
