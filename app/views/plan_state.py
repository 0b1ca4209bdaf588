"""The Plan page's shared UI state: the plan (`plan_layers`), its table version, the
errors already computed, and the one way to change a module (a group changes whole)."""

import streamlit as st

from app import state
from compressors.registry import groups


def init() -> None:
    """The plan state, started afresh for a new session or a different model."""
    spec = state.model_spec()
    if st.session_state.get("plan_model") != spec:
        st.session_state.plan_model = spec
        st.session_state.plan_layers = {}
        st.session_state.plan_v = st.session_state.get("plan_v", 0) + 1
        st.session_state.plan_base = None
        st.session_state.preview_history = []
        st.session_state.known_errors = {}
        st.session_state.auto_message = None


def rebase(layers: dict) -> None:
    """Replace the plan by `layers` and start a fresh table from it."""
    st.session_state.plan_layers = dict(layers)
    st.session_state.plan_v += 1
    st.session_state.plan_base = None


def table_key() -> str:
    return f"plan_table_{st.session_state.plan_v}"


def set_module(name: str, settings: dict | None, mats) -> None:
    """Change one module (a group's member, compressors.registry.groups: its whole group)
    and rebase the table."""
    layers = dict(st.session_state.plan_layers)
    methods = {n: s["method"] for n, s in layers.items()}
    methods[name] = settings["method"] if settings else None
    units = groups(mats, lambda m: methods.get(m.name))
    group = next([m.name for m in u] for u in units if any(m.name == name for m in u))
    for n in group:
        if settings is None:
            layers.pop(n, None)
        else:
            layers[n] = dict(settings)
    rebase(layers)


def plan_signature(layers: dict) -> str:
    """A short fingerprint of the plan's settings: a preview of another plan is stale."""
    import hashlib
    import json

    text = json.dumps(layers, sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def known_errors() -> dict:
    """(module, settings, calibration) -> (weight error, calibration-weighted error):
    keyed by the setting, so an edited module never shows its old error."""
    return st.session_state.setdefault("known_errors", {})


def error_key(name: str, settings: dict, calib_key: str | None) -> tuple:
    return name, repr(sorted(settings.items())), calib_key
