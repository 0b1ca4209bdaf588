"""Plain-text summaries of an analysis table for the terminal, and output-path checks."""

from __future__ import annotations

import tempfile
from pathlib import Path

from spectra.errors import SpectraInputError
from spectra.linalg.metrics import SUMMARY

OUT_FORMATS = (".parquet", ".csv", ".json")


def summaries(df):
    """(by_role, by_block) polars tables: count and mean of the summary metrics (the
    calib_* ones when `df` has them)."""
    import polars as pl

    metrics = [c for c in SUMMARY if c in df.columns]
    aggs = [pl.len().alias("n")] + [pl.col(c).mean().alias(c) for c in metrics]
    by_role = df.group_by("role", maintain_order=True).agg(aggs)
    by_block = df.filter(pl.col("block").is_not_null()).group_by("block").agg(aggs).sort("block")
    return by_role, by_block


def format_table(df, floats: int = 2) -> str:
    """Fixed-width text table of a small polars DataFrame."""
    cols = df.columns
    cells = [[_fmt(v, floats) for v in row] for row in df.iter_rows()]
    widths = [
        max(len(c), *(len(r[i]) for r in cells)) if cells else len(c) for i, c in enumerate(cols)
    ]
    lines = ["  ".join(c.rjust(w) for c, w in zip(cols, widths, strict=True))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(lines)


def _fmt(v, floats: int) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{floats}f}"
    return str(v)


def check_out_path(out: Path, formats=OUT_FORMATS) -> None:
    """Fail early, before any work, if `out` has a bad suffix or cannot be written."""
    if out.suffix.lower() not in formats:
        raise SpectraInputError(f"--out {out}: unsupported format (use {', '.join(formats)})")
    if out.is_dir():
        raise SpectraInputError(f"--out {out}: is a directory")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise SpectraInputError(f"--out {out}: directory {parent} does not exist")
    try:  # a real probe: os.access says yes to root even on read-only mounts
        with tempfile.NamedTemporaryFile(dir=parent, prefix=".spectra-probe-"):
            pass
    except OSError as e:
        raise SpectraInputError(f"--out {out}: not writable ({e.strerror})") from e
