"""Plan page: the selected decoder block's width (MLP neurons, key/value heads, a
sublayer skipped), a `width` entry of the plan named by the block, with its
calibration-weighted errors at once; the perplexity preview below measures it."""

import streamlit as st

from app import state
from app.views.plan_state import rebase
from spectra.errors import SpectraInputError
from spectra.plan import edit as pe
from spectra.plan.block_plan import blocks, heads_of

SKIPS = ("none", "attention", "mlp", "block")
SELECTS = ("greedy", "norm")


def gated_blocks(mats) -> dict[str, dict]:
    """{block name: {role: matrix}} of the blocks width can narrow (a gated MLP)."""
    out = {}
    for name, members in blocks(mats).items():
        by_role = {m.role: m for m in members}
        if {"gate", "up", "down", "q", "k", "v", "o"} <= set(by_role):
            out[name] = by_role
    return out


def block_editor(spec: str, mats) -> None:
    """The selected block's width controls and errors; a change edits the plan."""
    found = gated_blocks(mats)
    heads = heads_of(state.opened(spec).config)
    if not found or heads is None:
        st.caption("Width needs decoder blocks with a gated MLP and grouped attention.")
        return
    names = list(found)
    name = st.selectbox("Block", names, key="plan_block")
    roles = found[name]
    n_heads, kv = heads
    full = roles["down"].shape[1]
    current = dict(st.session_state.plan_layers.get(name) or {})
    tag = repr(sorted(current.items()))  # fresh widgets whenever the setting changes
    c = st.columns(4)
    # an imported plan's values outside what the widgets offer show as the nearest
    start = min(max(int(current.get("ffn") or full), 1), full)
    ffn = c[0].number_input("MLP neurons (ffn)", 1, full, start,
                            key=f"pw_ffn::{name}::{tag}")  # fmt: skip
    choices = [d for d in range(1, kv + 1) if kv % d == 0]
    at = lambda options, value, default: options.index(value if value in options else default)  # noqa: E731
    kv_heads = c[1].selectbox("Key/value heads", choices,
                              index=at(choices, current.get("kv_heads"), kv),
                              key=f"pw_kv::{name}::{tag}")  # fmt: skip
    skip = c[2].selectbox("Skip", SKIPS, index=at(SKIPS, current.get("skip"), "none"),
                          key=f"pw_skip::{name}::{tag}")  # fmt: skip
    select = c[3].selectbox("Neurons and heads chosen by", SELECTS,
                            index=at(SELECTS, current.get("select"), "greedy"),
                            key=f"pw_select::{name}::{tag}",
                            help="greedy: on the calibration (computed when a preview needs "
                            "it), down_proj refit by least squares; norm: data-free, by "
                            "the neurons' weight norms")  # fmt: skip
    wanted = {"method": "width"}
    if ffn < full:
        wanted["ffn"] = int(ffn)
    if kv_heads < kv:
        wanted["kv_heads"] = int(kv_heads)
    if skip != "none":
        wanted["skip"] = skip
    if len(wanted) > 1 and select != "greedy":
        wanted["select"] = select
    if _config(wanted if len(wanted) > 1 else {}) != _config(current):
        layers = dict(st.session_state.plan_layers)
        if len(wanted) > 1:
            layers[name] = wanted
        else:
            layers.pop(name, None)
        rebase(layers)
        st.rerun()
    # the plan's own count (spectra.plan.edit.totals, as `plan show`): the width entry
    # and what this block's modules carry beside it
    mine = {k: v for k, v in st.session_state.plan_layers.items() if k.startswith(f"{name}.")}
    if len(wanted) > 1:
        mine[name] = wanted
    kept = pe.totals(state.opened(spec), mine, list(roles.values()))["params_ratio"]
    e = st.columns([2, 2, 2, 4])
    e[0].metric("Block weights kept", f"{kept:.1%}")
    if len(wanted) == 1:
        e[1].metric("MLP output error", "0")
        e[2].metric("Key/value error", "0")
        e[3].caption("The block is kept whole.")
        return
    grams = state.calibration(spec)
    key = None if grams is None else str(grams.folder)
    try:
        err = state.block_error(spec, name, tuple(sorted(wanted.items())), key)
    except SpectraInputError as ex:
        e[3].caption(str(ex))
        return
    show = lambda v: "n/a" if v is None else f"{v:.4f}"  # noqa: E731
    e[1].metric("MLP output error", show(err["mlp"]))
    e[2].metric("Key/value error", show(err["kv"]))
    e[3].caption(
        "Calibration-weighted, relative: the MLP's output ||W_d Z^T - W_d' Z_S^T|| / "
        "||W_d Z^T|| on the calibration's intermediate activations Z; the key and value "
        "projections' outputs with each head replaced by its merged head. 1 for a "
        "removed sublayer; n/a until a calibration is computed (Calibrate above, or a "
        "preview). Modules of this block keep their own settings, applied to what "
        "width leaves."
    )


def _config(settings: dict):
    """The setting as a config (None: the block whole), so that equal settings written
    differently (an imported plan's defaults spelt out) compare equal."""
    from compressors.registry import make_config

    return make_config(**settings) if settings else None
