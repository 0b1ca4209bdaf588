"""A method's knobs as widgets and table columns, read from the registry (no page)."""

import streamlit as st

from compressors.registry import METHODS


def knob_of(name: str):
    """The knob behind a table column: the first registered method showing it."""
    return next(m.knob(name) for m in METHODS.values() if name in m.columns)


def dtype(name: str):
    """The polars dtype of a knob column (or `calibrated`): a column with no value set
    stays typed (numbers sort as numbers, blanks show empty, never "None")."""
    import polars as pl

    kind = "bool" if name == "calibrated" else knob_of(name).kind
    return {"int": pl.Int64, "float": pl.Float64, "bool": pl.Boolean}.get(kind, pl.String)


def widget(col, knob, value, shape: tuple[int, int], label: str | None = None):
    """One knob's input widget in `col`; returns the value chosen (None: unset)."""
    label = label or knob.name.replace("_", " ")
    if knob.kind == "bool":
        return col.checkbox(label, bool(value))
    if knob.kind == "choice":
        options = ("none", *knob.choices) if knob.default is None else knob.choices
        got = col.selectbox(label, options, options.index("none" if value is None else value))
        return None if got == "none" else got
    high = knob.high if knob.high is not None else max(shape)  # a rank or chi: min(m, n) or less
    if knob.kind == "int":
        return col.number_input(label, int(knob.low or 0), int(high), int(value), 1)
    return col.number_input(label, float(knob.low or 0), float(high), float(value), 0.01)


def column(name: str):
    """The table's column config of a knob column (or the `calibrated` switch)."""
    if name == "calibrated":
        return st.column_config.CheckboxColumn("calibrated")
    knob = knob_of(name)
    if knob.kind == "choice":
        return st.column_config.SelectboxColumn(name, options=list(knob.choices))
    if knob.kind == "bool":
        return st.column_config.CheckboxColumn(name)
    step = 1 if knob.kind == "int" else None
    return st.column_config.NumberColumn(name, min_value=knob.low, max_value=knob.high, step=step)
