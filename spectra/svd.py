"""Exact full singular value spectra.

Route: eigenvalues of the smaller Gram matrix in float64 (numpy turns `a.T @ a` into
one syrk call, half the flops of a product). Eigenvalues of a float64 Gram carry an
absolute error of a few eps * sigma_max^2, so every sigma above about 1e-5 * sigma_max
is exact to far better than 1e-4 relative. When the spectrum reaches below
GRAM_FLOOR * sigma_max the matrix is ill-conditioned or rank-deficient and its
spectrum is recomputed by a float64 SVD of the matrix itself, which is accurate
down to eps * sigma_max.

On the CPU, numpy (OpenBLAS) is used matrix by matrix from a thread pool with one
BLAS thread per worker: measured on 2 cores, that is 1.4x the throughput of torch's
batched eigvalsh, which runs its batch serially. On CUDA the same route runs
batched in torch (`singular_values_torch`).
"""

from __future__ import annotations

import numpy as np

GRAM_FLOOR = 1e-5


def singular_values(w: np.ndarray) -> np.ndarray:
    """All min(m, n) singular values of `w`, descending, float64."""
    w = np.asarray(w, dtype=np.float64)
    m, n = w.shape
    g = w.T @ w if m >= n else w @ w.T
    lam = np.linalg.eigvalsh(g)[::-1]
    s = np.sqrt(np.clip(lam, 0.0, None))
    if s[0] > 0 and s[-1] < GRAM_FLOOR * s[0]:
        s = np.linalg.svd(w, compute_uv=False)
    return s


def singular_values_torch(w):
    """Batched spectra of a (B, m, n) torch tensor on its device, descending, float64."""
    import torch

    w = w.to(torch.float64)
    m, n = w.shape[-2:]
    g = w.mT @ w if m >= n else w @ w.mT
    s = torch.linalg.eigvalsh(g).flip(-1).clamp_min(0).sqrt()
    bad = (s[:, 0] > 0) & (s[:, -1] < GRAM_FLOOR * s[:, 0])
    if bad.any():
        s[bad] = torch.linalg.svdvals(w[bad])
    return s


def singular_values_streamed(chunks) -> np.ndarray | None:
    """Spectrum of a tall matrix given as float64 row blocks: G = sum_c c^T c, never the whole.

    Returns None when the spectrum reaches below GRAM_FLOOR * sigma_max (the caller
    then needs the whole matrix for a float64 SVD).
    """
    g = None
    for c in chunks:
        part = c.T @ c
        g = part if g is None else g.__iadd__(part)
    s = np.sqrt(np.clip(np.linalg.eigvalsh(g)[::-1], 0.0, None))
    if s[0] > 0 and s[-1] < GRAM_FLOOR * s[0]:
        return None
    return s
