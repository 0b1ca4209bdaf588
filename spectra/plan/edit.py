"""Per-module plan editing for the app: rows <-> settings, defaults, exact totals.

A row is a plain dict: module, role, block, m, n, method ("dense" or a registered
method), the knobs (rank, energy, sparsity, pattern, bits, factor_bits, bond_dim, cores) and
`calibrated`, the method's data-aware switch (whiten for lowrank, joint, losparse and
mpo; gptq for quant; wanda for prune; caldera always); a knob a method does not use
is None.
"""

from __future__ import annotations

from compressors.apply import DATA_AWARE
from compressors.base import config_to_dict
from compressors.registry import make_config
from spectra.errors import SpectraInputError
from spectra.io import models
from spectra.plan import format as plans

KNOBS = (
    "rank",
    "energy",
    "sparsity",
    "pattern",
    "bits",
    "factor_bits",
    "bond_dim",
    "cores",
    "calibrated",
)
PATTERNS = ("2:4", "4:8")  # prune's semi-structured patterns offered in the app
# the data-aware switch of each method that has one (caldera is always data-aware)
CALIBRATED_FLAG = {m: flag for m, flag in DATA_AWARE.items() if flag is not None}
METHOD_KNOBS = {
    "dense": (),
    "lowrank": ("rank", "energy", "calibrated"),
    "joint": ("rank", "calibrated"),
    "losparse": ("rank", "sparsity", "calibrated"),
    "mpo": ("cores", "bond_dim", "calibrated"),
    "quant": ("bits", "calibrated"),
    "caldera": ("rank", "bits", "factor_bits"),
    "prune": ("sparsity", "pattern", "calibrated"),
}
METHODS = tuple(METHOD_KNOBS)


def default_settings(method: str, m: int, n: int) -> dict:
    """Settings a newly chosen method starts from for an (m, n) module."""
    half = max(1, m * n // (2 * (m + n)))
    if method == "lowrank":
        return {"method": method, "rank": half}
    if method == "joint":
        return {"method": method, "rank": half}
    if method == "losparse":
        return {"method": method, "rank": max(1, half // 2), "sparsity": 0.95}
    if method == "caldera":
        return {"method": method, "rank": min(32, m, n)}
    return {"method": method}


def config_of(settings: dict | None):
    """A validated config from settings (None = dense)."""
    if not settings or settings.get("method") in (None, "dense"):
        return None
    return make_config(**settings)


def row(mat, settings: dict | None) -> dict:
    out = dict(module=mat.name, role=mat.role, block=mat.block, m=mat.shape[0], n=mat.shape[1])
    config = config_of(settings)
    out["method"] = "dense" if config is None else config.method
    full = {} if config is None else config_to_dict(config)
    flag = CALIBRATED_FLAG.get(out["method"])
    if flag is not None:
        full["calibrated"] = bool(full.get(flag))
    for k in KNOBS:
        out[k] = full.get(k) if k in METHOD_KNOBS[out["method"]] else None
    return out


def settings_of(r: dict) -> dict | None:
    """Settings from an edited row: the method's knobs that are set; defaults fill gaps."""
    method = r.get("method") or "dense"
    if method == "dense":
        return None
    if method not in METHOD_KNOBS:
        raise SpectraInputError(f"{r['module']}: unknown method {method!r}")
    out = default_settings(method, r["m"], r["n"])
    given = {k: r.get(k) for k in METHOD_KNOBS[method] if r.get(k) is not None}
    if method == "lowrank" and "energy" in given:
        out.pop("rank", None)
        given.pop("rank", None)
    calibrated = given.pop("calibrated", None)
    if given.get("pattern"):  # the pattern fixes the sparsity (1 - N/M)
        given.pop("sparsity", None)
    out.update(given)
    if calibrated is not None and method in CALIBRATED_FLAG:
        out[CALIBRATED_FLAG[method]] = bool(calibrated)
    for k in ("rank", "bits", "factor_bits", "bond_dim", "cores"):
        if k in out and out[k] is not None:
            out[k] = int(out[k])
    return out


def totals(spec: str, layers: dict[str, dict], mats=None) -> dict:
    """Exact params/bits totals of explicit layers (module -> settings) on a model."""

    mats = mats if mats is not None else models.matrices(spec)
    plan = plans.parse({"layers": layers})
    return plans.totals(plans.resolve(plan, mats, rank_of=plans.energy_ranks(spec)))


def layers_from_plan(plan: plans.Plan, mats, spec: str) -> dict[str, dict]:
    """An imported plan (rules and layers) resolved to explicit per-module settings."""
    entries = plans.resolve(plan, mats, rank_of=plans.energy_ranks(spec))
    return {e.name: config_to_dict(e.config) for e in entries if e.config is not None}
