"""The Plan page's editable table of every module: its edits read back into the plan,
its sort, and each row's weight and calibration-weighted error filled in."""

import polars as pl
import streamlit as st

from app import state
from app.views import knobs as kw
from app.views.plan_state import error_key, known_errors, table_key
from app.views.progress import Eta
from compressors.registry import METHODS
from spectra.errors import SpectraInputError
from spectra.plan import edit as pe


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


SORTABLE = ("checkpoint order", "module", "role", "block", "m", "n", "method", "rank", "bits")


def _fresh_table() -> None:
    """A new filter or order: the table is rebuilt (its rows' order is fixed per version)."""
    st.session_state.plan_v += 1
    st.session_state.plan_base = None


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
