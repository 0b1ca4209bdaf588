"""Tensor network page: MPO bond spectra and entropies, chi(eps) heatmap, params vs chi."""

import numpy as np
import plotly.graph_objects as go
import streamlit as st

from app import state
from app.views.charts import log_y
from app.views.spectra_page import heatmap
from spectra.errors import SpectraInputError
from spectra.linalg import mpo


def render() -> None:
    st.title("Tensor network")
    spec = state.model_spec()
    cores = st.select_slider("MPO cores K", options=[2, 3, 4, 5, 6], value=3, key="tn_cores")
    try:
        with st.spinner(f"Bond spectra for K={cores} (cached after the first time)..."):
            df, _ = state.analysis(spec, cores)
    except SpectraInputError as e:
        st.error(str(e))
        return
    import polars as pl

    eps = df["mpo_eps"].drop_nulls()
    eps = float(eps[0]) if len(eps) else 0.1
    central = df.with_columns(
        pl.col("bond_chi").list.get(pl.col("bond_chi").list.len() // 2).alias("chi_central")
    )
    clicked = heatmap(central, "chi_central", f"chi(eps={eps:g}) at the central bond", "tn_heatmap")
    names = df["name"].to_list()
    if "tn_matrix" not in st.session_state:
        st.session_state.tn_matrix = names[0]
    if clicked:
        st.session_state.tn_matrix = clicked
    name = st.selectbox("Matrix", names, key="tn_matrix")
    row = df.filter(df["name"] == name).to_dicts()[0]
    mf, nf = tuple(row["mpo_m"]), tuple(row["mpo_n"])
    st.caption(
        f"{row['shape_m']} x {row['shape_n']} factored as m = {' x '.join(map(str, mf))}, "
        f"n = {' x '.join(map(str, nf))}; full bond dimensions {row['bond_dims']}; "
        f"chi(eps) per bond {row['bond_chi']}"
    )
    left, right = st.columns(2)
    fig = go.Figure()
    for i, s in enumerate(row["bond_spectra"]):
        s = np.asarray(s)
        fig.add_trace(go.Scatter(x=np.arange(1, len(s) + 1), y=s, name=f"bond {i + 1}"))
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
