"""The spectrum of W L (H = L L^T) through small Gram matrices, never an SVD of W L.

A tall weight (m >> n: a head, an embedding) goes through the n x n L^T W^T W L, W
widened ROWS rows at a time; a wide one (m <= n: down_proj) through the m x m W H W^T,
H widened BAND rows at a time. Whitened low rank's candidates, compression and error
curves (compressors.lowrank) read them; they hold no m x n float64.
"""

from __future__ import annotations

import torch

from compressors.base import BAND

ROWS = 8192  # rows of W widened to float64 at a time


def tall_terms(weight: torch.Tensor, chol: torch.Tensor, g: torch.Tensor | None):
    """(s_i^2, sum_j g_j (W L v_i)_j^2) of W L = U S V^T, largest first, for an (m, n)
    weight with m >> n, from the n x n matrices L^T W^T W L and L^T W^T diag(g) W L
    (W widened ROWS rows at a time): the same numbers as an SVD of W L up to float64
    rounding of s_i^2 relative to the largest, with n x n memory instead of m x n.
    Without g the terms are None."""
    s2, v = tall_eigh(weight, chol)
    if g is None:
        return s2, None
    weighted = grams(weight, g)
    return s2, ((chol.T @ weighted @ chol) @ v * v).sum(0)


def grams(weight: torch.Tensor, g: torch.Tensor | None = None) -> torch.Tensor:
    """W^T W (W^T diag(g) W with `g`) in float64, W widened ROWS rows at a time."""
    n = weight.shape[1]
    out = torch.zeros(n, n, dtype=torch.float64, device=weight.device)
    for lo in range(0, weight.shape[0], ROWS):
        w = weight[lo : lo + ROWS].detach().to(torch.float64)
        out.addmm_(w.T, w if g is None else w * g[lo : lo + ROWS, None].to(w))
    return out


def tall_eigh(weight: torch.Tensor, chol: torch.Tensor | None, gram=None):
    """(s^2, V) of W L = U S V^T, largest first, from L^T W^T W L (L = I if None)."""
    gram = grams(weight) if gram is None else gram
    m = gram if chol is None else chol.T @ gram @ chol
    s2, v = torch.linalg.eigh((m + m.T) / 2)
    return s2.flip(0).clamp_min(0), v.flip(1)


def wide_eigh(weight: torch.Tensor, hessian: torch.Tensor):
    """(s^2, U) of W L = U S V^T (H = L L^T), largest first, for an (m, n) weight with
    m <= n, from the m x m W H W^T = (W L)(W L)^T, H widened BAND rows at a time: no
    n x n factor of H and no SVD workspace (an 8B model's down_proj: 0.6 GB, not 3 GB).
    H is used as it is: it needs no jitter, as nothing is factored."""
    g = wide_gram(weight, hessian)
    s2, u = torch.linalg.eigh((g + g.T) / 2)
    return s2.flip(0).clamp_min(0), u.flip(1)


def wide_gram(weight: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
    """W H W^T in float64 for an (m, n) weight, H widened BAND rows at a time."""
    w = weight.detach().to(torch.float64)
    n = w.shape[1]
    g = torch.zeros(w.shape[0], w.shape[0], dtype=torch.float64, device=w.device)
    for lo in range(0, n, BAND):  # H symmetric: H[:, band] = H[band]^T
        band = hessian[lo : lo + BAND].to(w.device, torch.float64)
        g.addmm_(w @ band.T, w[:, lo : lo + BAND].T)
    return g
