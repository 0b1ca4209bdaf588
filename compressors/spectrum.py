"""Closed forms on a singular value spectrum that the compressors need (numpy only):
the rank keeping an energy share, and the best rank-k error at every k."""

from __future__ import annotations

import numpy as np


def energy_rank(s: np.ndarray, q: float) -> int:
    """Smallest k with sum_{i<=k} sigma_i^2 >= q * ||W||_F^2 (1e-12 relative slack)."""
    cum = np.cumsum(np.asarray(s, dtype=np.float64) ** 2)
    return int(np.searchsorted(cum, q * cum[-1] * (1 - 1e-12), side="left") + 1)


def rank_error_curve(s: np.ndarray) -> np.ndarray:
    """err[k] = ||W - W_k||_F / ||W||_F for the best rank-k approximation, k = 0..len(s)."""
    s2 = np.asarray(s, dtype=np.float64) ** 2
    tail = np.concatenate([np.cumsum(s2[::-1])[::-1], [0.0]])
    return np.sqrt(np.clip(tail / tail[0], 0.0, None)) if tail[0] > 0 else np.zeros_like(tail)
