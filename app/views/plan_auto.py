"""The Plan page's Auto-allocate: calibration size, damage, allocation rule and budget,
the allocation itself with its time left over every step, and its summary."""

import math

import streamlit as st

from app import allocations, memory, state
from app.allocations import Ask
from app.views import plan_build
from app.views.plan_state import plan_signature, rebase
from app.views.progress import Eta
from spectra.errors import SpectraInputError
from spectra.plan import edit as pe
from spectra.plan.defaults import APP_DAMAGES, DEFAULT_METHOD, DEFAULT_TARGET_PARAMS
from spectra.plan.grid import auto_methods
from spectra.plan.sensitivity import KINDS
from spectra.plan.strategies import RULES

# the first is the default: a data-free damage can be millions of times worse
DAMAGE = {k: "weight error (data-free)" if k == "none" else KINDS[k].label for k in APP_DAMAGES}
ALLOCATE = {name: rule.label for name, rule in RULES.items()}  # plan auto --allocate


# the method choices that are a method with a preset (`plan auto --preset`)
PRESETS = {"quant:llama.cpp": "quant (llama.cpp)"}

# what each phase of Auto-allocate is part of, as its progress says it
STEPS = {"block": "calibration", "candidates": "ranking"}


def damage_label(kind: str, calibrated: bool) -> str:
    if kind != "none" and KINDS[kind].calibrated and not calibrated:
        return f"{KINDS[kind].label} (computes the calibration first)"
    return DAMAGE[kind]


def budget_controls(spec: str) -> None:
    """Auto-allocate. Untouched, it takes the first hour's path (spectra.plan.defaults):
    whitened low rank at 80% of the parameters on the calibration-weighted loss estimate,
    computing the small calibration it needs first."""
    c = st.columns([2, 2, 2, 3, 2, 1.4])
    methods = [*auto_methods(), *PRESETS]
    method = c[0].selectbox(
        "Allocate with",
        methods,
        index=methods.index(DEFAULT_METHOD),
        key="auto_method",
        format_func=lambda m: PRESETS.get(m, m),
        help="quant (llama.cpp): only the grids a GGUF export keeps with their own codes "
        "(symmetric 4 and 8 bits in groups of 32: Q4_0, Q8_0), `plan auto --preset llama.cpp`",
    )
    method, preset = ("quant", method.partition(":")[2]) if method in PRESETS else (method, None)
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
        list(ALLOCATE),
        key="auto_allocate",
        format_func=ALLOCATE.get,
        help="loss: least predicted damage; the others by a rule, on the same budget "
        "(alpha: AlphaPruning, farms: alpha on square submatrices, owl: Wanda outliers, "
        "needs a calibration)",
    )
    c[5].write("")
    if c[5].button("Auto-allocate", key="auto_go", type="primary"):
        st.session_state.auto_fallback = None
        plan_build.stop(spec)  # the last plan's build (its modules stay in the store)
        bar = st.progress(0.0, "Preparing...")
        reads = (sens != "none" and KINDS[sens].calibrated) or RULES[allocate].needs_calibration
        calibrate = reads and not calibrated
        if calibrate and not state.can_calibrate(spec):
            calibrate, sens = False, "none"
            st.session_state.auto_fallback = (
                "This model cannot be calibrated (no tokenizer): allocated on the "
                "data-free weight error. Give it a tokenizer and compute a "
                "calibration (or `spectra calibrate MODEL`) for a calibrated plan."
            )
        # one time left over every step: calibration, then ranking
        eta = Eta(bar, "auto-allocate", plan=state.auto_steps(spec, calibrate), labels=STEPS)
        try:
            memory.check(state.opened(spec), "auto-allocate", state.calib_tokens())
            if calibrate:
                state.compute_calibration(spec, progress=eta)
            ask = Ask(method, kind, float(target), sens, state.calib_tokens(), allocate, preset)
            out = allocations.auto_layers(spec, ask, progress=eta)
        except SpectraInputError as e:
            bar.empty()
            st.error(str(e))
            return
        bar.empty()
        # the plan is chosen; its modules compress for the previews in the background
        plan_build.start(spec, {k: pe.config_of(v) for k, v in out["layers"].items()})
        rebase(out["layers"])
        st.session_state.auto_message = auto_message(method, sens, out["summary"], allocate)
        st.session_state.auto_damage = (f"auto: {DAMAGE[sens]}", plan_signature(out["layers"]))
        st.rerun()  # every control above (the calibration's caption) sees the new state
    if st.session_state.get("auto_message"):
        st.info(st.session_state.auto_message)
    if st.session_state.get("auto_fallback"):
        st.warning(st.session_state.auto_fallback)


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
        try:
            memory.check(state.opened(spec), "calibration", state.calib_tokens())
        except SpectraInputError as e:
            st.error(str(e))
            return
        bar = st.progress(0.0, "Calibrating...")
        state.compute_calibration(spec, progress=Eta(bar))
        bar.empty()
        st.rerun()
