"""The scores the rule strategies of `plan auto --allocate` map (spectra.plan.strategies):
per-module power-law alpha from the analysis (`alpha`), FARMS alpha (`farms`), and
OWL's per-block outlier ratio from the calibration (`owl`)."""

from __future__ import annotations

from dataclasses import dataclass

from spectra.plan.allocate import Unit

OUTLIER_M = 5.0  # OWL's M: a score above M x the block mean is an outlier


def outlier_ratio(weights: list, gram_diags: list, m: float = OUTLIER_M) -> float:
    """OWL's outlier ratio of a block: the share of Wanda scores |W_ij| * ||X_j|| (all
    `weights` pooled, (out, in) each, with ||X_j||^2 = `gram_diags`' H_jj) above `m`
    times their mean."""
    import torch

    def f64(a):
        return a.double() if isinstance(a, torch.Tensor) else torch.tensor(a, dtype=torch.float64)

    scores = [
        (f64(w).abs() * f64(d).clamp(min=0).sqrt()).reshape(-1)
        for w, d in zip(weights, gram_diags, strict=True)
    ]
    pooled = torch.cat(scores)
    return float((pooled > m * pooled.mean()).double().mean())


def owl_values(units: list[Unit], weights: dict, hessians: dict) -> dict[str, float]:
    """Every block's outlier ratio, given to each of its modules that has a Gram (a
    module without one is undefined: see `block_scores`)."""
    by_block: dict[object, list[str]] = {}
    for u in units:
        for n in u.names:
            if n in hessians:
                by_block.setdefault(u.block if u.block is not None else n, []).append(n)
    out = {}
    for names in by_block.values():
        ratio = outlier_ratio([weights[n] for n in names], [hessians[n].diagonal() for n in names])
        out.update({n: ratio for n in names})
    return out


@dataclass
class Scoring:
    """What a rule's scores may read: the model (spectra.io.model.Model), the units and
    their modules (spectra.plan.candidates), the damage the candidates were scored with
    and the calibration it read (or None), the strategy, whether caches are used, and
    the loaded network to run, if the caller holds one."""

    model: object
    units: list
    modules: list
    damage: object
    calibration: object
    strategy: object  # spectra.plan.strategies.Strategy
    use_cache: bool = True
    network: object = None


def alphas(scoring: Scoring, column: str = "alpha") -> tuple[dict, None]:
    """Per-module alpha (or FARMS alpha) from the cached analysis, tied copies included."""
    from spectra.analysis import analyze

    model, use_cache = scoring.model, scoring.use_cache
    df = analyze(model, cached_only=True) if use_cache else None
    df = df if df is not None else analyze(model, with_mpo=False, use_cache=use_cache)
    df = df.select("name", "aliases", "alpha")
    if column == "farms_alpha":
        from spectra.linalg.farms import farms_table

        farms = farms_table(model, use_cache=use_cache).select("name", "farms_alpha")
        df = df.join(farms, on="name").select("name", "aliases", alpha="farms_alpha")
    return {n: a for name, aliases, a in df.rows() for n in (name, *aliases)}, None


def outliers(scoring: Scoring) -> tuple[dict, dict]:
    """Every block's outlier ratio, on the damage's calibration; else the strategy's,
    the newest cached one, or FIRST_CALIB_TOKENS computed first."""
    from spectra.data import calibration
    from spectra.plan import candidates as cands
    from spectra.plan import sensitivity as sens
    from spectra.plan.defaults import FIRST_CALIB_TOKENS

    hessians = scoring.damage.hessian
    if hessians is not None:
        windows = dict(scoring.calibration.windows_key)
    else:
        settings = scoring.strategy.calib
        if settings is None:
            found = calibration.latest(scoring.model)
            if found is not None:
                c = found.settings
                settings = sens.SensitivitySettings("calib", c.corpus, c.tokens, c.seqlen)
            else:
                settings = sens.SensitivitySettings("calib", tokens=FIRST_CALIB_TOKENS)
        got = sens.calibrated(
            scoring.model, settings, scoring.use_cache, network=scoring.network, importance=False
        )
        hessians, windows = got.hessians, dict(settings.calib_spec(scoring.model).windows_key)
    weights = cands.Weights(scoring.modules)
    return owl_values(scoring.units, weights, hessians), windows
