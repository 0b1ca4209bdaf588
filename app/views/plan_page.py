"""Plan page: per-module settings with live errors, totals, Auto-allocate, ppl preview.

UI state: `plan_layers` (module -> settings dict, compressed modules only) is the
plan. The table is rebuilt from it whenever another control changes it (its key
carries `plan_v`); the table's own edits are read back from its widget state at the
top of the run, so every control below sees the same plan.
"""

import math

import polars as pl
import streamlit as st

from app import state
from app.views import knobs as kw
from app.views.progress import Eta
from compressors.registry import METHODS, groups, needs_data
from spectra.errors import SpectraInputError
from spectra.plan import edit as pe
from spectra.plan.defaults import DEFAULT_METHOD, DEFAULT_TARGET_PARAMS
from spectra.plan.grid import auto_methods
from spectra.plan.strategies import STRATEGIES

DAMAGE = {  # the first is the default: a data-free damage can be millions of times worse
    "calib": "calibration-weighted loss",
    "none": "weight error (data-free)",
    "fisher": "Fisher loss",
}


ALLOCATE = {  # plan auto --allocate
    "loss": "least predicted damage",
    "uniform": "uniform",
    "alpha": "alpha (AlphaPruning)",
    "farms": "FARMS alpha",
    "owl": "outliers (OWL)",
}

# what each phase of Auto-allocate is part of, as its progress says it
STEPS = {"block": "calibration", "candidates": "ranking", "compressing": "building"}


def init() -> None:
    """The plan state, started afresh for a new session or a different model."""
    spec = state.model_spec()
    if st.session_state.get("plan_model") != spec:
        st.session_state.plan_model = spec
        st.session_state.plan_layers = {}
        st.session_state.plan_v = st.session_state.get("plan_v", 0) + 1
        st.session_state.plan_base = None
        st.session_state.preview_history = []
        st.session_state.known_errors = {}
        st.session_state.auto_message = None


def rebase(layers: dict) -> None:
    """Replace the plan by `layers` and start a fresh table from it."""
    st.session_state.plan_layers = dict(layers)
    st.session_state.plan_v += 1
    st.session_state.plan_base = None


def table_key() -> str:
    return f"plan_table_{st.session_state.plan_v}"


def read_table_edits(mats) -> list[str]:
    """Fold the table's pending edits into plan_layers; returns problems found."""
    base = st.session_state.plan_base
    edits = st.session_state.get(table_key(), {}).get("edited_rows", {})
    if base is None or not edits:
        return []
    layers, problems = dict(st.session_state.plan_layers), []
    for index, change in edits.items():
        r = {**base[int(index)], **change}
        if "method" in change and change["method"] != base[int(index)]["method"]:
            for k in pe.knobs():  # a new method starts from its own defaults
                r[k] = change.get(k)
        try:
            settings = pe.settings_of(r)
            pe.config_of(settings)
        except SpectraInputError as e:
            problems.append(str(e))
            continue
        if settings is None:
            layers.pop(r["module"], None)
        else:
            layers[r["module"]] = settings
    st.session_state.plan_layers = layers
    return problems


def set_module(name: str, settings: dict | None, mats) -> None:
    """Change one module (a group's member, compressors.registry.groups: its whole group)
    and rebase the table."""
    layers = dict(st.session_state.plan_layers)
    methods = {n: s["method"] for n, s in layers.items()}
    methods[name] = settings["method"] if settings else None
    units = groups(mats, lambda m: methods.get(m.name))
    group = next([m.name for m in u] for u in units if any(m.name == name for m in u))
    for n in group:
        if settings is None:
            layers.pop(n, None)
        else:
            layers[n] = dict(settings)
    rebase(layers)


def damage_label(kind: str, calibrated: bool) -> str:
    if kind == "calib" and not calibrated:
        return "calibration-weighted loss (computes the calibration first)"
    return DAMAGE[kind]


def budget_controls(spec: str) -> None:
    """Auto-allocate. Untouched, it takes the first hour's path (spectra.plan.defaults):
    whitened low rank at 80% of the parameters on the calibration-weighted loss estimate,
    computing the small calibration it needs first."""
    c = st.columns([2, 2, 2, 3, 2, 1.4])
    methods = auto_methods()
    method = c[0].selectbox(
        "Allocate with", methods, index=methods.index(DEFAULT_METHOD), key="auto_method"
    )
    kind = c[1].radio(
        "Budget",
        ["params", "bits"],
        horizontal=True,
        key="auto_kind",
        format_func={"params": "fraction of params", "bits": "bits/param"}.get,
    )
    if kind == "params":
        target = c[2].number_input(
            "Target", 0.01, 1.0, DEFAULT_TARGET_PARAMS, 0.05, key="auto_target_params"
        )
    else:
        target = c[2].number_input("Target", 0.5, 16.0, 3.0, 0.25, key="auto_target_bits")
    calibrated = state.calibration(spec) is not None
    sens = c[3].selectbox(
        "Damage",
        list(DAMAGE),
        key="auto_sens",
        format_func=lambda k: damage_label(k, calibrated),
    )
    if sens == "none":
        c[3].caption(
            "Data-free: ranks modules by their weight error, which can be far from the "
            "loss (the demo at 50% of its parameters: perplexity in the millions)."
        )
    allocate = c[4].selectbox(
        "Allocation",
        STRATEGIES,
        key="auto_allocate",
        format_func=ALLOCATE.get,
        help="loss: least predicted damage; the others by a rule, on the same budget "
        "(alpha: AlphaPruning, farms: alpha on square submatrices, owl: Wanda outliers, "
        "needs a calibration)",
    )
    c[5].write("")
    if c[5].button("Auto-allocate", key="auto_go", type="primary"):
        st.session_state.auto_fallback = None
        bar = st.progress(0.0, "Preparing...")
        calibrate = (sens == "calib" or allocate == "owl") and not calibrated
        if calibrate and not state.can_calibrate(spec):
            calibrate, sens = False, "none"
            st.session_state.auto_fallback = (
                "This model cannot be calibrated (no tokenizer): allocated on the "
                "data-free weight error. Give it a tokenizer and compute a "
                "calibration (or `spectra calibrate MODEL`) for a calibrated plan."
            )
        # one time left over every step: calibration, ranking, building the modules
        eta = Eta(bar, "auto-allocate", plan=state.auto_steps(spec, calibrate), labels=STEPS)
        try:
            if calibrate:
                state.compute_calibration(spec, progress=eta)
            out = state.auto_layers(
                spec,
                method,
                kind,
                float(target),
                sens,
                state.calib_tokens(),
                progress=eta,
                allocate=allocate,
            )
        except SpectraInputError as e:
            bar.empty()
            st.error(str(e))
            return
        prebuild(spec, out["layers"], eta)
        bar.empty()
        rebase(out["layers"])
        st.session_state.auto_message = auto_message(method, sens, out["summary"], allocate)
        st.session_state.auto_damage = (f"auto: {DAMAGE[sens]}", plan_signature(out["layers"]))
        st.rerun()  # every control above (the calibration's caption) sees the new state
    if st.session_state.get("auto_message"):
        st.info(st.session_state.auto_message)
    if st.session_state.get("auto_fallback"):
        st.warning(st.session_state.auto_fallback)


def prebuild(spec: str, layers: dict, eta: Eta) -> None:
    """Compress the allocated plan into the store the previews read, so that the first
    preview only evaluates (a model that cannot be previewed, no tokenizer, skips it)."""
    if not state.can_calibrate(spec):
        return
    configs = {k: pe.config_of(v) for k, v in layers.items()}
    pv = state.previewer(spec)
    eta.expect("compressing", pv.pending(configs)["compressing"])
    pv.prebuild(configs, progress=eta)


def auto_message(method: str, sens: str, s: dict, allocate: str = "loss") -> str:
    """What Auto-allocate did and the quality its damage predicts, before any preview."""
    if allocate != "loss":
        return (
            f"Auto-allocated {method} by {ALLOCATE[allocate]}: {s['compressed']} of "
            f"{s['modules']} modules compressed, {s['params_ratio']:.1%} of parameters, "
            f"{s['bits_per_param']:.2f} bits/param. A rule, not a loss estimate: Preview "
            "measures its perplexity."
        )
    head = (
        f"Auto-allocated {method} on the {DAMAGE[sens]}: {s['compressed']} of {s['modules']} "
        f"modules compressed, {s['params_ratio']:.1%} of parameters, "
        f"{s['bits_per_param']:.2f} bits/param. "
    )
    d = s["predicted_damage"]
    if sens == "none":
        return head + (
            f"Predicted damage {d:.4g}: a sum of squared relative weight errors, not a "
            "loss; the perplexity can be far worse than it suggests (Preview measures it)."
        )
    return head + (
        f"Predicted loss increase {d:.3f} nats/token: perplexity about "
        f"{math.exp(d):.2f}x dense (the damage's own estimate; Preview measures it)."
    )


def calibration_controls(spec: str) -> None:
    """The calibration size, whether it is cached, and a button that computes it."""
    c = st.columns([2, 6, 2])
    # kept outside the widget's own state, which Streamlit drops on other pages
    st.session_state.calib_size = c[0].selectbox(
        "Calibration tokens",
        state.CALIB_TOKENS,
        index=state.CALIB_TOKENS.index(state.calib_tokens()),
        key="calib_tokens",
        format_func=lambda t: f"{t:,}",
    )
    grams = state.calibration(spec)
    if grams is not None:
        m = grams.meta
        c[1].caption(
            f"Calibration: {m['tokens']:,} tokens ({m['samples']} windows of {m['seqlen']}, "
            f"corpus {m['corpus']}), cached. Data-aware settings (calibrated, caldera) and "
            "calibration-weighted errors read it, as `spectra apply` of the exported plan does."
        )
        return
    c[1].caption(
        "No calibration of this model at this size yet. Data-aware settings (calibrated, "
        "caldera) and calibration-weighted errors need one: computed once (or by "
        "`spectra calibrate`), then cached."
    )
    if c[2].button("Compute calibration", key="calib_go"):
        bar = st.progress(0.0, "Calibrating...")
        state.compute_calibration(spec, progress=Eta(bar))
        bar.empty()
        st.rerun()


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
            if state.calibration(spec) is None and any(
                needs_data(c) for c in configs.values() if c is not None
            ):
                state.compute_calibration(spec, progress=Eta(bar))
            pv = state.previewer(spec)
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


def plan_signature(layers: dict) -> str:
    """A short fingerprint of the plan's settings: a preview of another plan is stale."""
    import hashlib
    import json

    text = json.dumps(layers, sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:12]


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


SORTABLE = ("checkpoint order", "module", "role", "block", "m", "n", "method", "rank", "bits")
SORTABLE += ("sparsity", "rel_error")


def _fresh_table() -> None:
    """A new filter or order: the table is rebuilt (its rows' order is fixed per version)."""
    st.session_state.plan_v += 1
    st.session_state.plan_base = None


def known_errors() -> dict:
    """(module, settings, calibration) -> (weight error, calibration-weighted error):
    keyed by the setting, so an edited module never shows its old error."""
    return st.session_state.setdefault("known_errors", {})


def error_key(name: str, settings: dict, calib_key: str | None) -> tuple:
    return name, repr(sorted(settings.items())), calib_key


def _row_errors(spec: str, base: list[dict], calib_key: str | None = None) -> dict:
    """module -> (weight error, calibration-weighted error), each None where unknown:
    dense rows are exact, plain low rank reads the cached spectrum, the rest what the
    module editor or the fill button computed for the module's current setting."""
    sigmas = state.sigmas(spec)
    layers, known = st.session_state.plan_layers, known_errors()
    out = {}
    for r in base:
        name = r["module"]
        settings = layers.get(name)
        if settings is None:
            out[name] = (0.0, 0.0 if calib_key else None)
            continue
        got = known.get(error_key(name, settings, calib_key))
        if got is None:  # closed forms (plain low rank: the spectrum), no compression
            errors_of, sigma = METHODS[settings["method"]].errors, sigmas.get(name)
            if errors_of and sigma is not None:
                closed = errors_of(pe.config_of(settings), None, sigma, None, None)
                got = (closed[0], None) if closed is not None else None
        out[name] = got or (None, None)
    return out


def fill_errors(spec: str, base: list[dict], calib_key: str | None, errors: dict) -> None:
    """A button that computes both errors of every listed module still missing one
    (each cached by setting), with progress; the table is redrawn after."""
    layers = st.session_state.plan_layers
    missing = [
        r["module"]
        for r in base
        if r["module"] in layers
        and (errors[r["module"]][0] is None or (calib_key and errors[r["module"]][1] is None))
    ]
    if not missing:
        return
    if st.button(f"Compute the missing errors of {len(missing)} modules", key="fill_errors"):
        bar = st.progress(0.0, "Errors...")
        eta = Eta(bar, "errors")
        for i, name in enumerate(missing):
            eta(i, len(missing), name)
            settings = layers[name]
            try:
                got = state.row_error(spec, name, tuple(sorted(settings.items())), calib_key)
            except SpectraInputError:  # a data-aware setting with no calibration
                continue
            known_errors()[error_key(name, settings, calib_key)] = got
        bar.empty()
        _fresh_table()
        st.rerun()


def table(spec: str, mats) -> None:
    layers = st.session_state.plan_layers
    grams = state.calibration(spec)
    calib_key = None if grams is None else str(grams.folder)
    c = st.columns([2, 2, 1.2, 4])
    only = c[0].toggle(
        "Only compressed modules", value=True, key="plan_only", on_change=_fresh_table
    )
    order = c[1].selectbox("Sort by", SORTABLE, key="plan_sort", on_change=_fresh_table)
    descending = c[2].toggle("Descending", key="plan_desc", on_change=_fresh_table)
    if st.session_state.plan_base is None:
        rows = [pe.row(m, layers.get(m.name)) for m in mats]
        if only and layers:
            rows = [r for r in rows if r["method"] != "dense"]
        if order != "checkpoint order":
            errors = _row_errors(spec, rows, calib_key)
            value = (
                (lambda r: errors[r["module"]][0]) if order == "rel_error" else (lambda r: r[order])
            )
            present = [r for r in rows if value(r) is not None]  # blanks last either way
            present.sort(key=value, reverse=descending)
            rows = present + [r for r in rows if value(r) is None]
        elif descending:
            rows = rows[::-1]
        st.session_state.plan_base = rows
    base = st.session_state.plan_base
    if only and not layers:
        c[3].caption("No module is compressed yet: every module is listed.")
    else:
        c[3].caption(f"{len(base)} of {len(mats)} modules listed.")
    errors = _row_errors(spec, base, calib_key)
    typed = dict(module=pl.String, role=pl.String, block=pl.Int64, m=pl.Int64, n=pl.Int64)
    typed |= {"method": pl.String, **{k: kw.dtype(k) for k in pe.knobs()}}
    df = pl.DataFrame(base, schema=typed).with_columns(
        pl.Series("rel_error", [errors[r["module"]][0] for r in base], dtype=pl.Float64),
        pl.Series("calib_error", [errors[r["module"]][1] for r in base], dtype=pl.Float64),
    )
    fill_errors(spec, base, calib_key, errors)
    st.data_editor(
        df,
        key=table_key(),
        hide_index=True,
        width="stretch",
        height=420,
        disabled=["module", "role", "block", "m", "n", "rel_error", "calib_error"],
        column_config={
            "method": st.column_config.SelectboxColumn("method", options=list(pe.methods())),
            **{k: kw.column(k) for k in pe.knobs()},
            "rel_error": st.column_config.NumberColumn("rel. error", format="%.4f"),
            "calib_error": st.column_config.NumberColumn("calib. error", format="%.4f"),
        },
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
    st.subheader("Selected module")
    module_editor(spec, mats)
    st.subheader("Budget and perplexity")
    totals_and_preview(spec, mats)
    st.subheader("All modules")
    table(spec, mats)
