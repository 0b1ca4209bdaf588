"""Tensor network page: MPO bond spectra and entropies, chi(eps) heatmap, params vs chi.

The bond profiles are computed here, not before: the chosen matrix's at once (cached
per matrix), every matrix's in the background for the heatmap, which fills in."""

import numpy as np
import plotly.graph_objects as go
import streamlit as st

from app import state
from app.views.charts import POLL_S, decimate, log_y
from app.views.spectra_page import arrived, heatmap
from spectra.linalg import mpo


def render() -> None:
    st.title("Tensor network")
    spec = state.checked_model()
    if spec is None:
        return
    cores = st.select_slider("MPO cores K", options=[2, 3, 4, 5, 6], value=3, key="tn_cores")
    job = state.mpo_job(spec, cores)
    job.touch()
    job.wait(0.5)  # a small model's profiles are all in by then
    polling = not job.finished
    st.fragment(run_every=POLL_S if polling else None)(body)(spec, job, polling)


def body(spec: str, job, polling: bool) -> None:
    import polars as pl

    job.touch()  # the page is open: keep computing
    df = arrived(job, polling, "Bond profiles")
    if df is None:
        return
    layout = state.matrix_table(spec)
    clicked = None
    if df.height:
        eps = job.settings.mpo_eps
        chi = pl.col("bond_chi")
        central = df.with_columns(chi.list.get(chi.list.len() // 2).alias("chi_central"))
        title = f"chi(eps={eps:g}) at the central bond"
        clicked = heatmap(central, "chi_central", title, "tn_heatmap", layout)
    names = layout["name"].to_list()
    if "tn_matrix" not in st.session_state:  # a block's matrix: the embedding is the slowest
        inner = layout.filter(layout["block"].is_not_null())["name"].to_list()
        st.session_state.tn_matrix = (inner or names)[0]
    if clicked:
        st.session_state.tn_matrix = clicked
    name = st.selectbox("Matrix", names, key="tn_matrix")
    with st.spinner(f"Bond spectra of {name} (cached after the first time)..."):
        row = job.row(name)
    profile(row)


def profile(row: dict) -> None:
    """One matrix's bond spectra, entropies and parameters against chi."""
    mf, nf = tuple(row["mpo_m"]), tuple(row["mpo_n"])
    st.caption(
        f"{row['shape_m']} x {row['shape_n']} factored as m = {' x '.join(map(str, mf))}, "
        f"n = {' x '.join(map(str, nf))}; full bond dimensions {row['bond_dims']}; "
        f"chi(eps) per bond {row['bond_chi']}"
    )
    left, right = st.columns(2)
    fig = go.Figure()
    for i, s in enumerate(row["bond_spectra"]):
        s, at = np.asarray(s), decimate(len(s))
        fig.add_trace(go.Scatter(x=at + 1, y=s[at], name=f"bond {i + 1}"))
    log_y(fig, row["bond_spectra"], "singular value")
    fig.update_layout(
        height=360, margin=dict(l=10, r=10, t=30, b=10), title="Bond spectra", xaxis_title="index"
    )
    left.plotly_chart(fig)
    fig = go.Figure(
        go.Bar(x=[f"bond {i + 1}" for i in range(len(row["bond_entropy"]))], y=row["bond_entropy"])
    )
    fig.update_layout(
        height=360,
        margin=dict(l=10, r=10, t=30, b=10),
        title="Entanglement entropy per bond",
        yaxis_title="nats",
    )
    right.plotly_chart(fig)
    top = max(row["bond_dims"])
    chis = np.unique(np.geomspace(1, top, 40).round().astype(int))
    params = [mpo.params_at_chi(mf, nf, int(c)) for c in chis]
    fig = go.Figure(go.Scatter(x=chis, y=params, mode="lines+markers", name="MPO"))
    fig.add_hline(y=row["shape_m"] * row["shape_n"], line_dash="dash", annotation_text="dense")
    fig.update_layout(
        height=340,
        margin=dict(l=10, r=10, t=30, b=10),
        title="Parameters vs max bond dimension",
        xaxis_title="chi",
        yaxis_title="parameters",
    )
    st.plotly_chart(fig)
