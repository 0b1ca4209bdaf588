"""Model page: choose a model, load it with progress, see what it is and what is cached."""

import streamlit as st

from app import state
from spectra.errors import SpectraInputError


def render() -> None:
    st.title("Model")
    state.model_spec()
    spec = st.text_input(
        "Model: demo, a local directory, a .safetensors or .gguf file, or a hub id",
        key="model_spec",
    )
    try:
        with st.spinner(f"Reading {spec} (the demo is converted once on first use)..."):
            table = state.matrix_table(spec)
            info = state.summary(spec)
        from spectra.analyze import analyze

        bar = st.progress(0.0, "spectra")
        status: dict = {}
        # the library call, not the Streamlit-cached one, so a miss can show progress;
        # a hit comes from the disk cache in milliseconds
        df = analyze(
            spec, info=status, progress=lambda d, t, n: bar.progress(d / t, f"spectra {d}/{t}: {n}")
        )
        cached = status.get("cached")
        bar.empty()
    except SpectraInputError as e:
        st.error(str(e))
        return
    c = st.columns(6)
    c[0].metric("Architecture", info["model_type"])
    c[1].metric("Blocks", info["layers"])
    c[2].metric("2-D weights", table.height)
    c[3].metric("Parameters in them", f"{info['params'] / 1e6:.1f}M")
    c[4].metric("dtype", info["dtype"])
    c[5].metric("Device", info["device"])
    st.caption(
        f"{info['architecture']} from `{info['root']}`; spectra of {df.height} distinct "
        f"matrices {'read from the cache' if cached else 'computed and cached'}."
    )
    st.dataframe(table, width="stretch", hide_index=True)
