"""Per-module plan editing for the app: rows <-> settings, defaults, exact totals.

A row is a plain dict: module, role, block, m, n, method ("dense" or a registered
method), the knobs every registered method shows in the table (its `columns`) and
`calibrated`, the method's data-aware switch (the first of its `flags`; a method
that always reads calibration has none); a knob a method does not use is None.
"""

from __future__ import annotations

from compressors.base import config_to_dict
from compressors.registry import METHODS, make_config, module_methods
from spectra.errors import SpectraInputError
from spectra.io.model import Model
from spectra.io.roles import block_prefix
from spectra.plan import format as plans
from spectra.plan import run
from spectra.plan.block_plan import heads_of


def knobs() -> tuple[str, ...]:
    """The table's knob columns: every registered method's, in registry order, then
    `calibrated`."""
    out = dict.fromkeys(k for m in METHODS.values() for k in m.columns)
    return (*out, "calibrated")


def method_knobs() -> dict[str, tuple[str, ...]]:
    """The columns each method ("dense" included) fills."""
    out = {"dense": ()}
    for name, m in METHODS.items():
        out[name] = m.columns + (("calibrated",) if m.switch else ())
    return out


def methods() -> tuple[str, ...]:
    """What a row's method may be: dense, then every registered method."""
    return ("dense", *module_methods())


def default_settings(method: str, m: int, n: int) -> dict:
    """Settings a newly chosen method starts from for an (m, n) module."""
    if method not in METHODS:
        return {"method": method}
    return {"method": method, **METHODS[method].defaults(m, n)}


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
    flag = None if config is None else METHODS[config.method].switch
    if flag is not None:
        full["calibrated"] = bool(full.get(flag))
    shown = method_knobs()[out["method"]]
    for k in knobs():
        out[k] = full.get(k) if k in shown else None
    return out


def settings_of(r: dict) -> dict | None:
    """Settings from an edited row: the method's knobs that are set; defaults fill gaps."""
    method = r.get("method") or "dense"
    if method == "dense":
        return None
    if method not in METHODS:
        raise SpectraInputError(f"{r['module']}: unknown method {method!r}")
    desc = METHODS[method]
    out = default_settings(method, r["m"], r["n"])
    given = {k: r.get(k) for k in method_knobs()[method] if r.get(k) is not None}
    calibrated = given.pop("calibrated", None)
    for knob in desc.knobs:  # energy replaces rank, a pattern fixes the sparsity
        if given.get(knob.name):
            for k in knob.overrides:
                out.pop(k, None)
                given.pop(k, None)
    out.update(given)
    if calibrated is not None and desc.switch is not None:
        out[desc.switch] = bool(calibrated)
    for knob in desc.knobs:
        if knob.kind == "int" and out.get(knob.name) is not None:
            out[knob.name] = int(out[knob.name])
    return out


def totals(model: Model, layers: dict[str, dict], mats=None) -> dict:
    """Exact params/bits totals of explicit layers (module -> settings) on a model
    (`mats`: a subset of its matrices, else all)."""

    mats = mats if mats is not None else model.matrices
    plan = plans.parse({"layers": layers})
    return plans.totals(
        plans.resolve(plan, mats, rank_of=run.energy_ranks(model), heads=heads_of(model.config))
    )


def layers_from_plan(plan: plans.Plan, mats, model: Model) -> dict[str, dict]:
    """An imported plan (rules and layers) resolved to explicit per-module settings."""
    entries = plans.resolve(
        plan, mats, rank_of=run.energy_ranks(model), heads=heads_of(model.config)
    )
    out = {e.name: config_to_dict(e.config) for e in entries if e.config is not None}
    for e in entries:  # a block's width setting, named by the block
        if e.width is not None:
            out.setdefault(block_prefix(e.name), config_to_dict(e.width))
    return out
