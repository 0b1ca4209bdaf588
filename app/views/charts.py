"""Chart helpers shared by the pages."""

import math

import numpy as np

POLL_S = 2.0  # how often a page redraws what a background analysis has added


def log_ticks(lo: float, hi: float) -> list[float]:
    """Readable tick values for a log axis from lo to hi: powers of ten over three or more
    decades, else the 1-2-5 sequence (1..9 or the two ends over a narrow range)."""
    lo = max(lo, 1e-300)
    hi = max(hi, lo)
    first, last = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
    wide = math.log10(hi / lo) >= 3
    for steps in ((1,) if wide else (1, 2, 5), tuple(range(1, 10))):
        ticks = [m * 10.0**e for e in range(first, last + 1) for m in steps]
        inside = [t for t in ticks if lo <= t <= hi]
        if len(inside) >= 2:
            return inside
    return [float(f"{lo:.3g}"), float(f"{hi:.3g}")]


def log_y(fig, values, title: str) -> None:
    """A log y axis with labelled ticks from `log_ticks` over the positive `values`."""
    v = np.concatenate([np.ravel(np.asarray(x, dtype=float)) for x in values] or [np.ones(1)])
    v = v[np.isfinite(v) & (v > 0)]
    lo, hi = (float(v.min()), float(v.max())) if v.size else (1.0, 10.0)
    ticks = log_ticks(lo, hi)
    fig.update_yaxes(type="log", title=title, tickvals=ticks, ticktext=[f"{t:.3g}" for t in ticks])


def heatmap_frame(df, metric: str, layout=None):
    """(blocks, roles, z) for a block x role heatmap of `metric`; missing cells None.
    `layout` (a table with block and role columns, e.g. every matrix of the model) adds
    the cells still to come, so a grid that fills in keeps its shape."""
    from spectra.io.roles import ROLES

    rows = df.filter(df["block"].is_not_null())
    cells = list(rows.select("block", "role").iter_rows())
    if layout is not None:
        cells += [c for c in layout.select("block", "role").iter_rows() if c[0] is not None]
    blocks = sorted({b for b, _ in cells})
    present = {r for _, r in cells}
    roles = [r for r in ROLES if r in present] + sorted(present - set(ROLES))
    z = [[None] * len(blocks) for _ in roles]
    index = {b: i for i, b in enumerate(blocks)}
    for r in rows.select("block", "role", metric).iter_rows():
        if r[1] in roles:
            z[roles.index(r[1])][index[r[0]]] = r[2]
    return blocks, roles, z


def block_ticks(blocks: list[int], most: int = 16) -> list[int]:
    """Integer tick values for a block axis: every block, or every k-th one from the
    first when there are more than `most` (evenly spaced, so none crowd the last)."""
    if len(blocks) <= most:
        return list(blocks)
    return list(blocks[:: math.ceil(len(blocks) / most)])


def decimate(n: int, points: int = 400) -> np.ndarray:
    """At most `points` sorted indices into a curve of n values, first and last kept:
    half evenly spaced, half log-spaced (the head of a spectrum, where it falls fast)."""
    if n <= points:
        return np.arange(n)
    even = np.linspace(0, n - 1, points // 2)
    logs = np.geomspace(1, n, points - points // 2) - 1
    idx = np.unique(np.concatenate([even, logs]).round().astype(np.int64))
    return idx[(idx >= 0) & (idx < n)]


def csv_text(df) -> str:
    """CSV of a table whose list columns are written as space-separated values."""
    import polars as pl

    cols = [
        pl.col(c).list.eval(pl.element().cast(pl.String)).list.join(" ")
        if isinstance(df.schema[c], pl.List)
        else pl.col(c)
        for c in df.columns
    ]
    return df.select(cols).write_csv()
