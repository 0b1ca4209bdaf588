"""Chart helpers shared by the pages."""

import math

import numpy as np


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
