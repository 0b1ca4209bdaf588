"""Sensitivity page: Fisher (fast) and ppl-probe (slow) sensitivities by block x role."""

import streamlit as st

from app import state
from app.views.progress import Eta
from app.views.spectra_page import heatmap
from spectra.errors import SpectraInputError


def render() -> None:
    st.title("Sensitivity")
    spec = state.checked_model()
    if spec is None:
        return
    kind = st.radio(
        "Kind",
        ["fisher", "ppl"],
        horizontal=True,
        key="sens_kind",
        format_func={
            "fisher": "Fisher (one gradient pass)",
            "ppl": "ppl probe (one forward per module, slow)",
        }.get,
    )
    tokens = st.select_slider(
        "Token budget",
        [256, 512, 1024, 2048, 4096, 8192],
        value=4096 if kind == "fisher" else 512,
        key=f"sens_tokens_{kind}",
    )
    st.caption(
        "Score per module: the loss increase (nats per token) of compressing it alone to "
        "a rank that keeps half its parameters, predicted by the diagonal Fisher or "
        "measured on the evaluation tokens. Results are cached on disk."
    )
    key = f"sens_result::{spec}::{kind}::{tokens}"
    if st.button("Compute", key="sens_compute", type="primary") or key in st.session_state:
        if key not in st.session_state:
            bar = st.progress(0.0, kind)
            try:
                st.session_state[key] = state.sensitivity_scores(
                    spec,
                    kind,
                    tokens,
                    Eta(bar, f"{kind} sensitivity"),
                )
            except SpectraInputError as e:
                st.error(str(e))
                return
            bar.empty()
        df = st.session_state[key]
        heatmap(df, "score", "loss increase (nats/token)", "sens_heatmap")
        st.dataframe(df.sort("score", descending=True), hide_index=True, width="stretch")
