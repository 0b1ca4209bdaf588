"""Sensitivity page: per-module sensitivity by block x role, and which spectral metric
predicts it (scatter coloured by role, Spearman rho overall and per role, a ranking)."""

import plotly.graph_objects as go
import polars as pl
import streamlit as st

from app import memory, state
from app.views.progress import Eta
from app.views.spectra_page import heatmap
from spectra.errors import SpectraInputError

TOKENS = [256, 512, 1024, 2048, 4096, 8192]


def _label(name: str) -> str:
    from spectra.plan.sensitivity import KINDS  # deferred: torch

    kind = KINDS[name]
    return f"{kind.label} ({kind.note})" if kind.note else kind.label


def render() -> None:
    st.title("Sensitivity")
    spec = state.checked_model()
    if spec is None:
        return
    from spectra.plan.sensitivity import KINDS  # deferred: torch

    kind = st.radio("Kind", list(KINDS), horizontal=True, key="sens_kind", format_func=_label)
    if KINDS[kind].calibrated:
        tokens = state.calib_tokens()
        st.caption(f"Calibration of {tokens:,} tokens (chosen on the Plan page).")
    else:
        tokens = st.select_slider(
            "Token budget",
            TOKENS,
            value=min(KINDS[kind].tokens, TOKENS[-1]),
            key=f"sens_tokens_{kind}",
        )
    st.caption(
        "Score per module: the loss increase (nats per token) of compressing it alone to "
        "a rank that keeps half its parameters, predicted by the diagonal Fisher, "
        "measured on the evaluation tokens, or predicted by the calibration-weighted loss "
        "estimate. Results are cached on disk; `spectra sensitivity MODEL --correlate` "
        "prints the same numbers."
    )
    key = f"sens_result::{spec}::{kind}::{tokens}"
    if st.button("Compute", key="sens_compute", type="primary") or key in st.session_state:
        if key not in st.session_state:
            bar = st.progress(0.0, kind)
            try:
                memory.check(state.opened(spec), "sensitivity", tokens)
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
        evidence(spec, df)


def evidence(spec: str, scores) -> None:
    """Which spectral metric predicts the score: a scatter of the chosen metric against
    it, coloured by role, with rho overall and per role, and the metrics ranked."""
    from spectra.plan.sensitivity_report import correlate  # deferred: torch

    st.subheader("Which metric predicts it")
    grams = state.calibration(spec)
    metrics = state.sensitivity_metrics(spec, None if grams is None else str(grams.folder))
    ranked = correlate(scores, metrics)
    if not ranked:
        st.info("No spectral metric to compare.")
        return
    names = [r["metric"] for r in ranked]
    metric = st.selectbox("Metric", names, key="sens_metric")
    row = next(r for r in ranked if r["metric"] == metric)
    joined = scores.join(metrics.select("name", metric), on="name", how="left")
    fig = go.Figure()
    for role in dict.fromkeys(joined["role"].to_list()):
        part = joined.filter(pl.col("role") == role)
        rho = row["by_role"].get(role)
        label = f"{role} (rho {rho:+.2f})" if rho is not None else role
        fig.add_trace(
            go.Scatter(
                x=part[metric].to_list(),
                y=part["score"].to_list(),
                mode="markers",
                name=label,
                text=part["name"].to_list(),
                hovertemplate="%{text}<br>%{x:.4g}, %{y:.4g}<extra></extra>",
            )
        )
    overall = "n/a" if row["rho"] is None else f"{row['rho']:+.3f}"
    fig.update_layout(
        title=f"{metric} vs sensitivity: Spearman rho {overall} over {row['n']} modules",
        xaxis_title=metric,
        yaxis_title="loss increase (nats/token)",
        height=420,
        margin=dict(l=10, r=10, t=40, b=10),
    )
    fig.update_yaxes(type="log")
    st.plotly_chart(fig, key="sens_scatter")
    roles = list(ranked[0]["by_role"])
    table = pl.DataFrame(
        [{"metric": r["metric"], "rho": r["rho"], "n": r["n"], **r["by_role"]} for r in ranked],
        schema={
            "metric": pl.String,
            "rho": pl.Float64,
            "n": pl.Int64,
            **{r: pl.Float64 for r in roles},
        },
    )
    st.caption(
        "Metrics ranked by |Spearman rho| with the sensitivity over every module (per role "
        "on the right; a role needs 3 modules). Negative: larger values, less damage."
    )
    st.dataframe(table, hide_index=True, width="stretch", key="sens_ranking")
