"""Thin caching wrappers around library calls, and the UI state the pages share."""

from __future__ import annotations

import os

import streamlit as st

from spectra import models


def default_model() -> str:
    return os.environ.get("SPECTRA_APP_MODEL", "demo")


@st.cache_data(show_spinner=False)
def matrix_table(spec: str):
    """One row per 2-D weight (read from file headers, no weights loaded)."""
    import polars as pl

    mats = models.matrices(models.resolve(spec))
    return pl.DataFrame(
        {
            "name": [m.name for m in mats],
            "role": [m.role for m in mats],
            "block": [m.block for m in mats],
            "shape": [f"{m.shape[0]} x {m.shape[1]}" for m in mats],
            "params": [m.shape[0] * m.shape[1] for m in mats],
            "dtype": [m.ref.dtype for m in mats],
        }
    )
