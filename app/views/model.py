"""Model page: choose a model, load it with progress, see what it is and what is cached."""

import streamlit as st

from app import state
from spectra.analysis import analyze
from spectra.errors import SpectraInputError
from spectra.io import models


def memory_line(run: dict) -> str:
    """How the model is held while previews, sensitivities and calibration run it."""
    held = (
        f"resident: about {run['resident_gb']:.3g} GB"
        if run["offload"] == "none"
        else f"streamed from disk one block at a time: about {run['streamed_gb']:.3g} GB "
        f"(resident it would take {run['resident_gb']:.3g} GB)"
    )
    free = f" of the {run['free_gb']:.3g} GB free" if run.get("free_gb") is not None else ""
    return (
        f"Runs in {run['dtype']} on {run['device']}, {held}{free} "
        "(`spectra app --dtype ... --offload auto|none|disk` to choose)."
    )


def render() -> None:
    st.title("Model")
    state.model_spec()
    spec = st.text_input(
        "Model: demo, a local directory, a .safetensors or .gguf file, or a hub id",
        key="model_spec",
    )
    try:
        convert = st.progress(0.0, f"Reading {spec}...")
        # uncached, so that a first GGUF conversion shows what it does; later it is instant
        models.resolve(spec, progress=lambda d, t, what: convert.progress(d / max(t, 1), what))
        convert.empty()
        table = state.matrix_table(spec)
        info = state.summary(spec)
        run = state.opened(spec).describe()

        bar = st.progress(0.0, "spectra")
        status: dict = {}
        # the library call, not the Streamlit-cached one, so a miss can show progress;
        # a hit comes from the disk cache in milliseconds
        df = analyze(
            state.opened(spec),
            info=status,
            progress=lambda d, t, n: bar.progress(d / t, f"spectra {d}/{t}: {n}"),
        )
        cached = status.get("cached")
        bar.empty()
    except SpectraInputError as e:
        st.error(str(e))
        return
    st.markdown(
        f"**Architecture** {info['architecture']} (`{info['model_type']}`) · "
        f"**Stored as** {info['storage']}"
        + (f", de-quantized to {info['dtype']}" if info["converted"] else "")
    )
    c = st.columns(5)
    c[0].metric("Blocks", info["layers"])
    c[1].metric("2-D weights", table.height)
    c[2].metric("Parameters in them", f"{info['params'] / 1e6:.1f}M")
    c[3].metric("Working dtype", run["dtype"])
    c[4].metric("Device", run["device"])
    st.caption(memory_line(run))
    converted = info["converted"]
    origin = (
        f"de-quantized from `{converted.get('gguf', spec)}` ({info['storage']}) to "
        f"{info['dtype']} once"
        + (f" in {converted['seconds']:.0f} s" if converted.get("seconds") else "")
        + f", cached at `{info['root']}`"
        if converted
        else f"read from `{info['root']}`"
    )
    st.caption(
        f"Weights {origin}; spectra of {df.height} distinct matrices "
        f"{'read from the cache' if cached else 'computed and cached'}."
    )
    if not info["has_config"]:
        st.warning(
            f"{info['root']} has no config.json, so the architecture is unknown and the "
            "model cannot be built: spectra, tensor networks and plans work from the weights "
            "alone, but perplexity previews, sensitivities and `spectra apply` need the "
            "model's config.json beside its weights."
        )
    st.dataframe(table, width="stretch", hide_index=True)
