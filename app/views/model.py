"""Model page: choose a model and see at once what it is (from its config and file
headers, no weight read), how it will be held, and how far its spectra are: they are
computed in the background, one matrix at a time, while the page is in use."""

import streamlit as st

from app import state
from app.views.charts import POLL_S
from spectra.background import eta_text
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
        job = state.spectra_job(spec)  # started now, in the background
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
    st.caption(f"Weights {origin}.")
    polling = not job.finished
    st.fragment(run_every=POLL_S if polling else None)(spectra_line)(job, polling)
    if not info["has_config"]:
        st.warning(
            f"{info['root']} has no config.json, so the architecture is unknown and the "
            "model cannot be built: spectra, tensor networks and plans work from the weights "
            "alone, but perplexity previews, sensitivities and `spectra apply` need the "
            "model's config.json beside its weights."
        )
    st.dataframe(table, width="stretch", hide_index=True)


def spectra_line(job, polling: bool) -> None:
    """How far the background spectra are (redrawn until they are all in)."""
    p = job.progress()
    if p["error"]:
        st.error(p["error"])
        return
    if polling and p["finished"]:
        st.rerun()  # the whole page once more, without polling
    if not p["finished"]:
        st.progress(
            p["done"] / max(p["total"], 1),
            f"Spectra: {eta_text(p)}; the Spectra page draws them as they arrive "
            f"({p['cached']} read from the cache)",
        )
        return
    where = (
        "read from the cache"
        if not p["computed"]
        else f"computed in {p['seconds']:.0f} s and cached"
        + (f" ({p['cached']} read from the cache)" if p["cached"] else "")
    )
    st.caption(f"Spectra of {job.table().height} distinct matrices {where}.")
