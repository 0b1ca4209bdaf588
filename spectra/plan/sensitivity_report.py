"""Which spectral metric predicts damage: per-module sensitivity against the spectra.

`sensitivity_table` gives one number per linear module: the loss increase of
compressing that module alone to the `lowrank-half` probe (the rank that keeps half
its parameters), as
- `fisher`: predicted by the diagonal empirical Fisher, 0.5 * sum F (W - W_hat)^2;
- `ppl`: measured on the evaluation tokens (one forward pass per module);
- `calib`: predicted by the calibrated loss estimate of `plan auto`'s calib damage,
  0.5 * sum_i F_i (E H E^T)_ii / rows (spectra.plan.candidates.Damage) with E the
  probe's error, H the calibration Gram and F the outputs' loss weights.
The sensitivities themselves are cached (spectra.plan.sensitivity), and so is the
table (cache/sensitivity/scores-<key>.parquet).

`correlate` ranks metrics by their Spearman rank correlation rho with the score,
over every module and within each role (a role needs 3 modules with both numbers;
a metric constant over a set has no rho there). Metrics: the analysis's `alpha`,
`stable_rank`, `erank`, `energy_rank_90`, `energy_rank_99`, FARMS alpha
(spectra.linalg.farms) and, where a calibration exists, the activation-aware
`calib_*` ones (spectra.data.calib_spectra). Tables are ranked by |rho| overall
(the sign says the direction: a negative rho means larger values, less damage).
"""

from __future__ import annotations

from dataclasses import asdict

import torch

from compressors.registry import compress
from spectra.io import cache
from spectra.io.model import Model
from spectra.plan import sensitivity as sens
from spectra.plan.defaults import DEFAULT_PROBE
from spectra.plan.format import NOT_TARGETABLE

SCORES_VERSION = 1
METRICS = ("alpha", "farms_alpha", "stable_rank", "erank", "energy_rank_90", "energy_rank_99")
CALIB_METRICS = ("calib_erank", "calib_stable_rank", "calib_energy_rank_90", "calib_energy_rank_99")
MIN_MODULES = 3  # fewer pairs have no rho


def sensitivity_table(
    model: Model,
    settings: sens.SensitivitySettings,
    use_cache: bool = True,
    progress=None,
    info: dict | None = None,
    network=None,
):
    """(name, role, block, score) per linear module, polars; `info` gets `cached`.
    `network`: the loaded torch model to run, if the caller holds one (else the model's
    shared one, as it was opened). Keyed by the weights, the working dtype and settings."""
    import polars as pl

    info = {} if info is None else info
    key = model.cache_key(SCORES_VERSION, asdict(settings))
    path = cache.cache_dir() / "sensitivity" / f"scores-{key}.parquet"
    info.update(cached=False, path=str(path))
    if use_cache and path.is_file():
        try:
            hit = pl.read_parquet(path)
            if hit.columns == ["name", "role", "block", "score"]:
                info.update(cached=True)
                return hit
        except Exception:  # a truncated or garbage file: recomputed
            pass
    mats = [m for m in model.matrices if m.role not in NOT_TARGETABLE]
    if settings.kind == "calib":
        got = sens.calibrated(model, settings, use_cache, progress, network)
        scores = calib_scores(got, mats)
    else:
        result = sens.compute(model, settings, use_cache, progress, network)
        weights = None
        if settings.kind == "fisher":
            weights = {m.name: torch.from_numpy(m.read()) for m in mats if m.name in result}
        scores = sens.scores(result, settings.kind, weights)
    rows = [(m.name, m.role, m.block, scores[m.name]) for m in mats if m.name in scores]
    df = pl.DataFrame(
        rows,
        schema={"name": pl.String, "role": pl.String, "block": pl.Int64, "score": pl.Float64},
        orient="row",
    )
    if use_cache:
        with cache.atomic_path(path) as tmp:
            df.write_parquet(tmp)
    return df


def calib_scores(got: sens.Calibrated, mats) -> dict:
    """The calibrated loss estimate of each module's lowrank-half error (`got`: the
    calibration with its loss weights; `mats`: the modules, spectra.io.model.Matrix)."""
    from spectra.plan.candidates import Damage, Module

    dmg = Damage(hessian=got.hessians, importance=got.importance, rows=got.rows)
    out = {}
    for m in mats:
        if m.name not in got.hessians and m.name not in (got.importance or {}):
            continue
        w = torch.from_numpy(m.read())
        e = w - compress(w, sens.PROBES[DEFAULT_PROBE](*w.shape)).to_dense().to(w.dtype)
        out[m.name] = dmg(Module(m.name, m.role, m.block, w), e)
    return out


def metric_table(model: Model, use_cache: bool = True, calibration=None, progress=None):
    """Per module name (aliases of tied weights included): METRICS, and CALIB_METRICS
    from the calibration `calibration` (spectra.data.calibration.Grams) when given."""
    import polars as pl

    from spectra.analysis import analyze
    from spectra.linalg.farms import farms_table

    df = analyze(model, cached_only=True) if use_cache else None
    if df is None:
        df = analyze(model, with_mpo=False, use_cache=use_cache, progress=progress)
    farms = farms_table(model, use_cache=use_cache, progress=progress)
    df = df.join(farms.select("name", "farms_alpha"), on="name", how="left")
    df = df.select("name", "aliases", *METRICS)
    df = pl.concat(
        [
            df.drop("aliases"),
            df.explode("aliases")
            .filter(pl.col("aliases").is_not_null())
            .drop("name")
            .rename({"aliases": "name"})
            .select("name", *METRICS),
        ]
    )
    if calibration is not None:
        from spectra.data.calib_spectra import calib_table

        calib = calib_table(model, calibration.settings, use_cache=use_cache, progress=progress)
        df = df.join(calib.select("name", *CALIB_METRICS), on="name", how="left")
    return df


def pairs(x, y):
    """(a, b) float64 arrays of the pairs of `x` and `y` where both are finite numbers."""
    import numpy as np

    a = np.asarray([np.nan if v is None else v for v in x], dtype=np.float64)
    b = np.asarray([np.nan if v is None else v for v in y], dtype=np.float64)
    ok = np.isfinite(a) & np.isfinite(b)
    return a[ok], b[ok]


def spearman(x, y) -> float | None:
    """Spearman's rho of paired values (ties share their mean rank; pairs with a NaN or
    None dropped); None for fewer than MIN_MODULES pairs or a constant side."""
    import numpy as np
    import polars as pl

    a, b = pairs(x, y)
    if a.size < MIN_MODULES:
        return None
    ra = pl.Series(a).rank("average").to_numpy().astype(np.float64)
    rb = pl.Series(b).rank("average").to_numpy().astype(np.float64)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = float(np.sqrt((ra * ra).sum() * (rb * rb).sum()))
    return None if den == 0 else float((ra * rb).sum() / den)


def correlate(scores, metrics) -> list[dict]:
    """Per metric of `metrics` (a metric_table): rho with the score over every module
    (`rho`, `n`) and per role (`by_role`: role -> rho or None), ranked by |rho|."""
    joined = scores.join(metrics, on="name", how="left")
    roles = list(dict.fromkeys(joined["role"].to_list()))
    out = []
    for metric in (c for c in metrics.columns if c != "name"):
        if joined[metric].is_null().all():
            continue
        x, y = joined[metric].to_list(), joined["score"].to_list()
        n = len(pairs(x, y)[0])
        by_role = {}
        for role in roles:
            part = joined.filter(joined["role"] == role)
            by_role[role] = spearman(part[metric].to_list(), part["score"].to_list())
        out.append(dict(metric=metric, rho=spearman(x, y), n=n, by_role=by_role))
    return sorted(out, key=lambda r: -abs(r["rho"]) if r["rho"] is not None else 1.0)
