"""Exact full singular value spectra.

Route: eigenvalues of the smaller Gram matrix in float64 (numpy turns `a.T @ a` into
one syrk call, half the flops of a product). Eigenvalues of a float64 Gram carry an
absolute error of a few eps * sigma_max^2, so every sigma above about 1e-5 * sigma_max
is exact to far better than 1e-4 relative. When the spectrum reaches below
GRAM_FLOOR * sigma_max the matrix is ill-conditioned or rank-deficient and its
spectrum is recomputed by a float64 SVD of the matrix itself, which is accurate
down to eps * sigma_max.

A matrix that is not float64 and contiguous already (float32 weights, strided views)
is widened in row blocks of CHUNK_BYTES, each summed into the Gram while it is
still in cache: a float64 copy of the whole matrix is made only for the SVD
fallback.

On the CPU, numpy (OpenBLAS) is used matrix by matrix from a thread pool with one
BLAS thread per worker: measured on 2 cores, that is 1.4x the throughput of torch's
batched eigvalsh, which runs its batch serially. On CUDA the same route runs
batched in torch (`singular_values_torch`).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from spectra.linalg import scratch

GRAM_FLOOR = 1e-5
CHUNK_BYTES = 4 * 2**20


def singular_values(w: np.ndarray) -> np.ndarray:
    """All min(m, n) singular values of `w`, descending, float64."""
    s = gram_spectrum(gram(w))
    if s is None:
        s = np.linalg.svd(np.asarray(w, dtype=np.float64), compute_uv=False)
    return s


def gram(w: np.ndarray) -> np.ndarray:
    """The smaller Gram matrix of `w` in float64: w^T w when tall, w w^T when wide."""
    t = w if w.shape[0] >= w.shape[1] else w.T
    if t.dtype == np.float64 and (t.flags.c_contiguous or t.flags.f_contiguous):
        return t.T @ t
    rows = max(1, CHUNK_BYTES // (8 * t.shape[1]))
    return gram_of_blocks(t[lo : lo + rows] for lo in range(0, t.shape[0], rows))


def gram_of_blocks(blocks: Iterable[np.ndarray]) -> np.ndarray:
    """sum_b b^T b over row blocks of one matrix; a block that is not float64 and
    contiguous is first copied into float64 scratch."""
    g = None
    for b in blocks:
        if b.dtype != np.float64 or not (b.flags.c_contiguous or b.flags.f_contiguous):
            buf = scratch.buffer("gram_block", b.size).reshape(b.shape)
            np.copyto(buf, b)
            b = buf
        part = b.T @ b
        g = part if g is None else g.__iadd__(part)
    return g


def gram_spectrum(g: np.ndarray) -> np.ndarray | None:
    """Singular values from a Gram matrix, descending; None when the spectrum reaches
    below GRAM_FLOOR * sigma_max (the caller then needs a float64 SVD)."""
    s = np.sqrt(np.clip(np.linalg.eigvalsh(g)[::-1], 0.0, None))
    if s[0] > 0 and s[-1] < GRAM_FLOOR * s[0]:
        return None
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
    return gram_spectrum(gram_of_blocks(chunks))
