"""Spectra page: a metric heatmap by block x role, singular value curves, the full table."""

import numpy as np
import plotly.graph_objects as go
import streamlit as st

from app import state
from app.views import width_spectra
from app.views.charts import POLL_S, block_ticks, csv_text, decimate, heatmap_frame, log_y
from app.views.progress import Eta
from spectra.background import eta_text
from spectra.linalg.metrics import HEATMAP, METRICS, rank_error_curve


def heatmap(df, metric: str, title: str, key: str, layout=None):
    """A block x role heatmap; a click on a cell selects that matrix (returned by name,
    once per click). Plotly selects points, not heatmap cells: a transparent marker on
    every cell takes the click and names the module and the metric on hover. `layout`
    (every matrix's block and role) keeps the cells still to come in the grid."""
    blocks, roles, z = heatmap_frame(df, metric, layout)
    names = {(b, r): n for n, b, r in df.select("name", "block", "role").iter_rows()}
    cells = [
        (b, r, v)
        for j, r in enumerate(roles)
        for i, b in enumerate(blocks)
        if (v := z[j][i]) is not None and (b, r) in names
    ]
    fig = go.Figure(
        go.Heatmap(
            z=z,
            x=blocks,
            y=roles,
            colorscale="Viridis",
            colorbar=dict(title=title),
            hoverinfo="skip",
        )
    )
    fig.add_trace(
        go.Scatter(
            x=[c[0] for c in cells],
            y=[c[1] for c in cells],
            customdata=[[names[c[0], c[1]], c[2]] for c in cells],
            mode="markers",
            marker=dict(symbol="square", size=22, color="rgba(0,0,0,0)"),
            hovertemplate="%{customdata[0]}<br>" + title + ": %{customdata[1]:.4g}<extra></extra>",
            showlegend=False,
        )
    )
    fig.update_layout(
        height=120 + 28 * len(roles),
        margin=dict(l=10, r=10, t=30, b=10),
        xaxis_title="block",
        title=title,
        clickmode="event+select",
    )
    if blocks:  # the markers' padding must not shift the grid off its cells
        fig.update_xaxes(
            range=[blocks[0] - 0.5, blocks[-1] + 0.5],
            tickmode="array",
            tickvals=block_ticks(blocks),
        )
    event = st.plotly_chart(fig, key=key, on_select="rerun", selection_mode="points")
    points = (event or {}).get("selection", {}).get("points", []) if event else []
    hit = None
    if points:
        p = points[0]
        data = p.get("customdata")
        if data:
            hit = data[0]
        else:
            found = df.filter((df["block"] == p.get("x")) & (df["role"] == p.get("y")))
            hit = found["name"].to_list()[0] if found.height else None
    last = st.session_state.get(f"{key}::last")
    st.session_state[f"{key}::last"] = hit
    return hit if hit != last else None  # the same selection on a rerun is no new click


def spectrum_kind(spec: str):
    """The weights / activation-aware switch; the calibration (None: weights only)."""
    c = st.columns([3, 7])
    kind = c[0].radio(
        "Spectrum",
        ["weights", "activation-aware"],
        horizontal=True,
        key="spectra_kind",
        help="activation-aware: singular values of W L with L L^T = X^T X on the calibration "
        "inputs; their tail is the calibration-weighted error of the best rank k",
    )
    grams = state.calibration(spec)
    if kind == "weights":
        return None
    if grams is None:
        c[1].caption(
            "Activation-aware spectra need a calibration of this model (the Plan page's "
            "size, or `spectra calibrate`); computed once, then cached."
        )
        if c[1].button("Compute calibration", key="spectra_calib_go"):
            bar = st.progress(0.0, "Calibrating...")
            grams = state.compute_calibration(spec, progress=Eta(bar, "calibration"))
            bar.empty()
        else:
            return None
    return grams


def render() -> None:
    st.title("Spectra")
    spec = state.checked_model()
    if spec is None:
        return
    job = state.spectra_job(spec)
    job.wait(0.5)  # a small model's spectra are all in by then
    polling = not job.finished  # redraw as rows arrive, until the last one
    st.fragment(run_every=POLL_S if polling else None)(body)(spec, job, polling)


def arrived(job, polling: bool, what: str = "Spectra"):
    """The rows the job has so far (None after showing its error); its progress bar."""
    p = job.progress()
    if p["error"]:
        st.error(p["error"])
        return None
    df = job.table()
    if polling and p["finished"]:
        st.rerun()  # the whole page once more, without polling
    if not p["finished"]:
        st.progress(
            p["done"] / max(p["total"], 1),
            f"{what}: {eta_text(p)} (the page fills in as they arrive)",
        )
    return df


def body(spec: str, job, polling: bool) -> None:
    df = arrived(job, polling)
    if df is None:
        return
    if df.height == 0:
        st.info("Computing the first spectra: they appear here as each matrix finishes.")
        return
    layout = state.matrix_table(spec)
    grams = spectrum_kind(spec)
    aware = grams is not None
    if aware:
        with st.spinner("Activation-aware spectra (cached after the first time)..."):
            df = df.join(state.calib_spectra(spec, str(grams.folder)), on="name", how="left")
    calib_of = {m.of: m.name for m in METRICS.values() if m.aware}
    options = [n for n in HEATMAP if n in calib_of] if aware else list(HEATMAP)
    metric = st.selectbox(
        "Metric", options, format_func=lambda n: METRICS[n].label, key=f"spectra_metric::{aware}"
    )
    column = calib_of[metric] if aware else metric
    title = METRICS[column].label
    clicked = heatmap(df, column, title, "spectra_heatmap", layout)
    chosen = pick(layout, clicked)
    if chosen:
        curves(df, chosen, aware)
    if aware:
        width_spectra.render(spec, str(grams.folder), layout)
    table = df.drop("sigma", "calib_sigma", "bond_spectra", "content_hash", strict=False)
    st.dataframe(table, width="stretch", hide_index=True, key="spectra_table")
    st.download_button(
        "Download CSV", csv_text(table), file_name="spectra.csv", mime="text/csv", key="spectra_csv"
    )


def pick(layout, clicked: str | None) -> list[str]:
    """The matrices whose curves are drawn: a middle block's q, o and down at first,
    then what the user picks or clicks (kept across pages)."""
    names = layout["name"].to_list()
    # the pick lives outside the widget's own state, which Streamlit drops on other pages
    if st.session_state.get("spectra_picked") is None:
        blocks = sorted(b for b in set(layout["block"].to_list()) if b is not None)
        mid = blocks[len(blocks) // 2] if blocks else None
        first = layout.filter((layout["block"] == mid) & layout["role"].is_in(["q", "o", "down"]))
        st.session_state.spectra_picked = first["name"].to_list() or names[:1]
    picked = [n for n in st.session_state.spectra_picked if n in names]
    if clicked and clicked not in picked:
        picked = [*picked, clicked][-6:]
    if clicked or st.session_state.get("spectra_selected") is None:
        st.session_state.spectra_selected = picked
    chosen = st.multiselect("Matrices", names, key="spectra_selected")
    st.session_state.spectra_picked = list(chosen)
    return chosen


def curves(df, chosen: list[str], aware: bool) -> None:
    """Singular values, cumulative energy and rank-vs-error of the chosen matrices that
    have arrived, each curve decimated to a few hundred points (the table is exact)."""
    rows = {r["name"]: r for r in df.filter(df["name"].is_in(chosen)).to_dicts()}
    waiting = [n for n in chosen if n not in rows]
    if waiting:
        st.caption(f"Not computed yet: {', '.join(waiting)}.")
    tabs = st.tabs(["Singular values", "Cumulative energy", "Rank vs error"])
    figs = [go.Figure() for _ in tabs]
    shown = []
    for name in [n for n in chosen if n in rows]:
        weights = np.asarray(rows[name]["sigma"])
        calib = rows[name].get("calib_sigma")
        s = np.asarray(calib) if aware and calib is not None else weights
        at = decimate(len(s))
        shown.append(s[at])
        energy = np.cumsum(s**2) / np.sum(s**2)
        figs[0].add_trace(go.Scatter(x=at + 1, y=s[at], name=name, mode="lines"))
        figs[1].add_trace(go.Scatter(x=at + 1, y=energy[at], name=name, mode="lines"))
        err = rank_error_curve(weights)
        at = decimate(len(err))
        figs[2].add_trace(go.Scatter(x=at, y=err[at], name=f"{name} (weight)", mode="lines"))
        if calib is not None:  # the calibration-weighted error of the whitened rank k
            err = rank_error_curve(np.asarray(calib))
            at = decimate(len(err))
            figs[2].add_trace(
                go.Scatter(
                    x=at,
                    y=err[at],
                    name=f"{name} (calibration-weighted)",
                    mode="lines",
                    line=dict(dash="dash"),
                )
            )
    log_y(figs[0], shown, "sigma of W L" if aware else "sigma")
    figs[1].update_yaxes(
        title="share of ||W X^T||_F^2" if aware else "share of ||W||_F^2", range=[0, 1.01]
    )
    figs[2].update_yaxes(title="relative error of rank k (solid: weight, dashed: calib.)")
    for tab, fig, x in zip(tabs, figs, ["index", "rank k", "rank k"], strict=True):
        fig.update_layout(height=380, margin=dict(l=10, r=10, t=10, b=10), xaxis_title=x)
        tab.plotly_chart(fig)
