"""Spectra page, activation-aware: each chosen block's MLP intermediate activation
spectrum (the singular values of Z, down_proj's inputs on the calibration) beside the
width the plan gives it, and its effective rank (`plan auto --allocate erank` reads it)."""

import numpy as np
import plotly.graph_objects as go
import polars as pl
import streamlit as st
from plotly.colors import qualitative

from app import state
from app.views.charts import decimate, log_y


def mlp_blocks(layout) -> list[str]:
    """The block names with a down_proj, in the model's order."""
    names = layout.filter(layout["role"] == "down")["name"].to_list()
    return [n.rsplit(".mlp.", 1)[0] for n in names if ".mlp." in n]


def render(spec: str, calib_key: str, layout) -> None:
    blocks = mlp_blocks(layout)
    if not blocks:
        return
    st.subheader("MLP intermediate activations")
    layers = st.session_state.get("plan_layers") or {}
    planned = [b for b in blocks if (layers.get(b) or {}).get("method") == "width"]
    stored = st.session_state.get("width_blocks")
    if stored is None or any(b not in blocks for b in stored):  # a first visit, another model
        st.session_state.width_blocks = planned[:4] or [blocks[len(blocks) // 2]]
    chosen = st.multiselect("Blocks", blocks, key="width_blocks")
    fig, rows, shown = go.Figure(), [], []
    palette = qualitative.Plotly
    for i, block in enumerate(chosen):
        got = state.intermediate_spectrum(spec, calib_key, block)
        if got is None:
            continue
        s, erank, neurons = got
        setting = layers.get(block) or {}
        width = 0 if setting.get("skip") in ("mlp", "block") else setting.get("ffn") or neurons
        at = decimate(len(s))
        shown.append(s[at])
        color = palette[i % len(palette)]
        fig.add_trace(go.Scatter(x=at + 1, y=s[at], name=block, mode="lines", line_color=color))
        fig.add_vline(x=max(width, 1), line_dash="dash", line_color=color,
                      annotation_text=f"width {width}")  # fmt: skip
        kept = float(np.sum(s[:width] ** 2) / np.sum(s**2)) if width else 0.0
        rows.append(dict(block=block, neurons=neurons, erank=round(erank, 1), width=width,
                         top_width_energy=round(kept, 4)))  # fmt: skip
    if not rows:
        st.caption("No calibration of these blocks' MLPs.")
        return
    log_y(fig, shown, "sigma of Z")
    fig.update_layout(height=380, margin=dict(l=10, r=10, t=10, b=10), xaxis_title="index")
    st.plotly_chart(fig, key="width_spectra_chart")
    st.dataframe(pl.DataFrame(rows), hide_index=True, width="stretch", key="width_spectra_table")
    st.caption(
        "sigma of Z: the singular values of the MLP's intermediate activations on the "
        "calibration (down_proj's inputs). Dashed: the width the plan keeps (the Plan "
        "page's block editor; the MLP's neurons when it sets none). top_width_energy: the "
        "share of ||Z||_F^2 in the first `width` singular values, what `width` neurons "
        "could keep at best. erank: exp of the entropy of sigma / sum(sigma)."
    )
