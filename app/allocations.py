"""Auto-allocations, made once per request and shared by every session."""

from __future__ import annotations

from dataclasses import dataclass

import streamlit as st

from app import state


@dataclass(frozen=True)
class Ask:
    """One Auto-allocate request, as the Plan page's controls set it.

    `key`: "params" or "bits", the budget `target` is in; `calib_tokens`: the calibration
    size a calib damage reads; `allocate`: the strategy (spectra.plan.strategies);
    `preset`: a quant preset (`plan auto --preset`)."""

    method: str
    key: str
    target: float
    sensitivity: str
    calib_tokens: int = 0
    allocate: str = "loss"
    preset: str | None = None


@st.cache_resource(show_spinner=False)
def _allocations() -> dict:
    """Auto-allocations made so far, shared by sessions (never mutated once stored)."""
    return {}


def auto_layers(spec: str, ask: Ask, progress=None) -> dict:
    """Auto-allocated explicit plan layers (module -> settings dict) and its summary
    (`progress` hears the damage's phases: a page element, which st.cache_data could
    not replay, hence the plain store)."""
    store = _allocations()
    if (spec, ask) not in store:
        store[spec, ask] = _auto_layers(spec, ask, progress)
    return store[spec, ask]


def _auto_layers(spec: str, ask: Ask, progress) -> dict:
    # deferred: torch, needed only once a preview, an error or an allocation is asked for
    from compressors.base import config_to_dict
    from spectra.plan import sensitivity as sens
    from spectra.plan.auto import auto_plan
    from spectra.plan.grid import Floors
    from spectra.plan.strategies import Strategy

    key = "target_params" if ask.key == "params" else "target_bits"
    c = state.calib_settings(spec)  # what a calib damage and owl's outlier ratios read
    calib = sens.SensitivitySettings("calib", c.corpus, c.tokens, c.seqlen)
    # the model as the app opened it (dtype, offload) and the shared network every
    # page's calibration and sensitivity run: no second resident copy
    result = auto_plan(
        state.opened(spec),
        ask.method,
        sensitivity=ask.sensitivity,
        sens_settings=calib if ask.sensitivity == "calib" else None,
        progress=progress,
        strategy=Strategy(ask.allocate, calib=calib),
        floors=Floors(preset=ask.preset),
        **{key: ask.target},
    )
    return {
        "layers": {k: config_to_dict(c) for k, c in result.plan.layers.items()},
        "summary": result.summary(),
    }
