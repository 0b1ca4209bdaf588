"""Spectra page: a metric heatmap by block x role, singular value curves, the full table."""

import numpy as np
import plotly.graph_objects as go
import streamlit as st

from app import state
from app.views.charts import log_y
from spectra.errors import SpectraInputError
from spectra.linalg.metrics import rank_error_curve


def heatmap(df, metric: str, title: str, key: str):
    """A block x role heatmap; a click on a cell selects that matrix (returned by name)."""
    blocks, roles, z = state.heatmap_frame(df, metric)
    fig = go.Figure(
        go.Heatmap(z=z, x=blocks, y=roles, colorscale="Viridis", colorbar=dict(title=title))
    )
    fig.update_layout(
        height=120 + 28 * len(roles),
        margin=dict(l=10, r=10, t=30, b=10),
        xaxis_title="block",
        title=title,
    )
    event = st.plotly_chart(fig, key=key, on_select="rerun", selection_mode="points")
    points = (event or {}).get("selection", {}).get("points", []) if event else []
    if points:
        b, r = points[0].get("x"), points[0].get("y")
        hit = df.filter((df["block"] == b) & (df["role"] == r))["name"].to_list()
        return hit[0] if hit else None
    return None


def render() -> None:
    st.title("Spectra")
    spec = state.model_spec()
    try:
        with st.spinner("Computing spectra (cached after the first time)..."):
            df, _ = state.analysis(spec)
    except SpectraInputError as e:
        st.error(str(e))
        return
    metric = st.selectbox(
        "Metric", list(state.METRICS), format_func=state.METRICS.get, key="spectra_metric"
    )
    clicked = heatmap(df, metric, state.METRICS[metric], "spectra_heatmap")
    names = df["name"].to_list()
    if "spectra_selected" not in st.session_state:  # one middle block's q, o and down
        blocks = sorted(b for b in set(df["block"].to_list()) if b is not None)
        mid = blocks[len(blocks) // 2] if blocks else None
        pick = df.filter((df["block"] == mid) & df["role"].is_in(["q", "o", "down"]))
        st.session_state.spectra_selected = pick["name"].to_list() or names[:1]
    if clicked and clicked not in st.session_state.spectra_selected:
        st.session_state.spectra_selected = [*st.session_state.spectra_selected, clicked][-6:]
    chosen = st.multiselect("Matrices", names, key="spectra_selected")
    if chosen:
        rows = {r["name"]: r for r in df.filter(df["name"].is_in(chosen)).to_dicts()}
        tabs = st.tabs(["Singular values", "Cumulative energy", "Rank vs error"])
        figs = [go.Figure() for _ in tabs]
        for name in chosen:
            s = np.asarray(rows[name]["sigma"])
            k = np.arange(1, len(s) + 1)
            energy = np.cumsum(s**2) / np.sum(s**2)
            figs[0].add_trace(go.Scatter(x=k, y=s, name=name, mode="lines"))
            figs[1].add_trace(go.Scatter(x=k, y=energy, name=name, mode="lines"))
            err = rank_error_curve(s)
            figs[2].add_trace(go.Scatter(x=np.arange(len(err)), y=err, name=name, mode="lines"))
        log_y(figs[0], [rows[n]["sigma"] for n in chosen], "sigma")
        figs[1].update_yaxes(title="share of ||W||_F^2", range=[0, 1.01])
        figs[2].update_yaxes(title="||W - W_k|| / ||W||")
        for tab, fig, x in zip(tabs, figs, ["index", "rank k", "rank k"], strict=True):
            fig.update_layout(height=380, margin=dict(l=10, r=10, t=10, b=10), xaxis_title=x)
            tab.plotly_chart(fig)
    table = df.drop("sigma", "bond_spectra", "content_hash", strict=False)
    st.dataframe(table, width="stretch", hide_index=True, key="spectra_table")
    st.download_button(
        "Download CSV",
        state.csv_text(table),
        file_name="spectra.csv",
        mime="text/csv",
        key="spectra_csv",
    )
