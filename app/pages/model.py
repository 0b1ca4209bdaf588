"""Model page: choose a model and list its matrices."""

import streamlit as st

from app import state
from spectra.errors import SpectraInputError


def render() -> None:
    st.title("Model")
    if "model_spec" not in st.session_state:
        st.session_state.model_spec = state.default_model()
    spec = st.text_input(
        "Model: demo, a local directory, a .safetensors or .gguf file, or a hub id",
        key="model_spec",
    )
    try:
        with st.spinner(f"Reading {spec} (the demo is converted once on first use)..."):
            table = state.matrix_table(spec)
    except SpectraInputError as e:
        st.error(str(e))
        return
    params = int(table["params"].sum())
    c1, c2, c3 = st.columns(3)
    c1.metric("2-D weights", table.height)
    c2.metric("Parameters in them", f"{params / 1e6:.1f}M")
    c3.metric("Blocks", table["block"].drop_nulls().n_unique())
    st.dataframe(table, width="stretch", hide_index=True)
