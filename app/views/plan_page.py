"""Plan page: per-module settings with live errors, totals, Auto-allocate, ppl preview.

UI state: `plan_layers` (module -> settings dict, compressed modules only) is the
plan. The table is rebuilt from it whenever another control changes it (its key
carries `plan_v`); the table's own edits are read back from its widget state at the
top of the run, so every control below sees the same plan.
"""

import polars as pl
import streamlit as st

from app import memory, state
from app.views import knobs as kw
from app.views import plan_build, plan_width
from app.views.plan_auto import budget_controls, calibration_controls
from app.views.plan_state import error_key, init, known_errors, plan_signature, rebase, set_module
from app.views.plan_table import read_table_edits, table
from app.views.progress import Eta
from compressors.registry import METHODS, needs_data
from spectra.errors import SpectraInputError
from spectra.plan import edit as pe

__all__ = ["init", "rebase", "render"]


def module_editor(spec: str, mats) -> None:
    """The selected module's settings with its error, updated at once."""
    names = [m.name for m in mats]
    by_name = {m.name: m for m in mats}
    if "plan_module" not in st.session_state:
        st.session_state.plan_module = names[0]
    name = st.selectbox("Module", names, key="plan_module")
    mat = by_name[name]
    current = st.session_state.plan_layers.get(name)
    tag = repr(sorted((current or {}).items()))  # fresh widgets whenever the setting changes
    c = st.columns(6)
    methods = list(pe.methods())
    method = c[0].selectbox(
        "Method",
        methods,
        index=methods.index(current["method"] if current else "dense"),
        key=f"pm_method::{name}::{tag}",
    )
    if method != (current["method"] if current else "dense"):
        set_module(
            name, None if method == "dense" else pe.default_settings(method, *mat.shape), mats
        )
        st.rerun()
    settings = dict(current or {})
    shown = pe.method_knobs().get(method, ())
    knobs = {k: v for k, v in settings.items() if k in shown}
    if method != "dense":
        desc = METHODS[method]
        config = pe.config_of(settings)
        full = dict(config.__dict__)
        edited = dict(settings)
        i = 1
        for k in shown:
            field = desc.switch if k == "calibrated" else k
            if full.get(field) is None and desc.knob(field).kind != "choice":
                continue  # unset (a rank given as energy, or the energy of a rank)
            with c[i]:
                label = "calibrated" if k == "calibrated" else None
                value = kw.widget(
                    st, desc.knob(field), knobs.get(field, full.get(field)), mat.shape, label
                )
            i += 1
            if value != full.get(field):
                edited[field] = value
                for other in desc.knob(field).overrides if value else ():
                    edited.pop(other, None)  # energy replaces rank, a pattern the sparsity
        if edited != settings:
            try:
                pe.config_of(edited)
            except SpectraInputError as e:
                st.error(str(e))
            else:
                set_module(name, edited, mats)
                st.rerun()
    grams = state.calibration(spec)
    key = None if grams is None else str(grams.folder)
    e = st.columns([2, 2, 6])
    try:
        err, calib_err = (
            state.row_error(spec, name, tuple(sorted(settings.items())), key)
            if current
            else (0.0, 0.0 if key else None)
        )
        e[0].metric("Relative error", f"{err:.4f}")
        e[1].metric(
            "Calibration-weighted error", "n/a" if calib_err is None else f"{calib_err:.4f}"
        )
        if current:
            known_errors()[error_key(name, settings, key)] = (err, calib_err)
        e[2].caption(
            "Relative error: ||W - W_hat|| / ||W||. Calibration-weighted: ||(W - W_hat) X^T|| "
            "/ ||W X^T|| on the calibration inputs X (needs a calibration)."
        )
    except SpectraInputError as ex:
        e[0].metric("Relative error", "n/a")
        e[1].metric("Calibration-weighted error", "n/a")
        e[2].caption(str(ex))


def totals_and_preview(spec: str, mats) -> None:
    layers = st.session_state.plan_layers
    try:
        t = pe.totals(state.opened(spec), layers, mats)
    except SpectraInputError as e:
        st.error(str(e))
        return
    c = st.columns(4)
    c[0].metric("Modules compressed", f"{t['compressed']} / {t['modules']}")
    c[1].metric("Parameters kept", f"{t['params_ratio']:.1%}")
    c[2].metric("Bits per parameter", f"{t['bits_per_param']:.2f}")
    dense_mb = t["bits_before"] / 8 / 2**20
    c[3].metric(
        "Size",
        f"{t['size_mb_after']:.1f} MB",
        help="Linear modules as stored (what `spectra apply` writes). The dense figure "
        "counts them as fp16 storage, 16 bits per weight; the float32 working copy the "
        f"app and previews compute with takes twice that ({2 * dense_mb:.1f} MB).",
    )
    c[3].caption(f"from {dense_mb:.1f} MB dense as fp16 storage (float32 working copy: 2x)")
    p = st.columns([2, 2, 6])
    tokens = p[0].selectbox(
        "Preview tokens", [512, 1024, 2048, 4096], index=2, key="preview_tokens"
    )
    go = p[1].button("Preview perplexity", key="preview_go")
    p[2].caption(
        "A running preview shows its progress and time left; Streamlit's Stop (top "
        "right) cancels it at the next block."
    )
    if st.session_state.pop("preview_running", False) and not go:
        st.info("Preview cancelled; the next one recomputes what it left unfinished.")
    if go:
        bar = st.progress(0.0, "Preparing the preview...")
        st.session_state.preview_running = True
        try:  # Stop (or a rerun) raises out of `bar.progress`: preview_running stays True
            configs = {k: pe.config_of(v) for k, v in layers.items()}
            memory.check(state.opened(spec), "preview", int(tokens), t["params_after"])
            if state.calibration(spec) is None and any(
                needs_data(c) for c in configs.values() if c is not None
            ):
                state.compute_calibration(spec, progress=Eta(bar))
            pv = state.previewer(spec)
            plan_build.wait(spec, bar)  # Auto-allocate's modules, still compressing
            plan = pv.pending(configs, int(tokens))  # every phase counts in the time left
            r = pv.preview(configs, int(tokens), progress=Eta(bar, plan=plan))
        except SpectraInputError as e:
            st.session_state.preview_running = False
            st.error(str(e))
        else:
            st.session_state.preview_running = False
            bar.empty()
            st.session_state.preview_history.append(
                dict(
                    plan=plan_signature(layers),
                    damage=damage_of(layers),
                    calibration=calibration_name(spec),
                    settings=settings_summary(layers),
                    tokens=r.tokens,
                    dense_ppl=r.dense_ppl,
                    ppl=r.ppl,
                    changed=len(r.changed),
                    recompressed=r.recompressed,
                    first_block=r.first_block,
                    seconds=round(r.seconds, 2),
                    params_kept=round(t["params_ratio"], 4),
                    bits_per_param=round(t["bits_per_param"], 3),
                )
            )
    history = st.session_state.preview_history
    if history:
        last = history[-1]
        stale = last.get("plan") != plan_signature(layers)
        if stale:
            st.warning(
                "Out of date: the plan has changed since this preview. Preview again to "
                "measure the plan as it is now."
            )
        q = st.columns(3)
        q[0].metric("Dense perplexity", f"{last['dense_ppl']:.4f}")
        q[1].metric(
            "Compressed perplexity (out of date)" if stale else "Compressed perplexity",
            f"{last['ppl']:.4f}",
            delta=f"{last['ppl'] - last['dense_ppl']:+.4f}",
            delta_color="inverse",
        )
        q[2].metric("Preview time", f"{last['seconds']:.2f} s")
        shown = [{k: v for k, v in h.items() if k != "plan"} for h in history[::-1]]
        st.dataframe(pl.DataFrame(shown), hide_index=True, width="stretch", key="preview_table")


def damage_of(layers: dict) -> str:
    """The damage the plan was allocated on, and whether it was edited since."""
    auto = st.session_state.get("auto_damage")
    if not auto:
        return "by hand"
    return auto[0] + ("" if auto[1] == plan_signature(layers) else ", then edited")


def calibration_name(spec: str) -> str:
    """The calibration the data-aware settings read: tokens and cache key (or none)."""
    grams = state.calibration(spec)
    return "none" if grams is None else f"{grams.tokens:,} tokens, {grams.folder.name}"


def settings_summary(layers: dict) -> str:
    """`lowrank x154 (whiten x150)`: the methods in the plan and their calibrated ones."""
    counts: dict[str, list[int]] = {}
    for v in layers.values():
        c = counts.setdefault(v["method"], [0, 0])
        c[0] += 1
        flag = METHODS[v["method"]].switch
        c[1] += bool(flag and v.get(flag))
    return (
        ", ".join(
            f"{m} x{n}" + (f" ({METHODS[m].switch} x{k})" if k else "")
            for m, (n, k) in sorted(counts.items())
        )
        or "dense"
    )


def render() -> None:
    st.title("Plan")
    init()
    spec = state.model_spec()
    try:
        mats = [m for m in state.opened(spec).matrices if m.role != "embed"]
    except SpectraInputError as e:
        st.error(str(e))
        return
    for problem in read_table_edits(mats):
        st.error(problem)
    calibration_controls(spec)
    budget_controls(spec)
    plan_build.status(spec)
    st.subheader("Selected module")
    module_editor(spec, mats)
    st.subheader("Selected block: width")
    plan_width.block_editor(spec, mats)
    st.subheader("Budget and perplexity")
    totals_and_preview(spec, mats)
    st.subheader("All modules")
    table(spec, mats)
