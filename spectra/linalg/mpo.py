"""Tensor-network (MPO / tensor-train) profiles of weight matrices.

A (m, n) matrix with m = m_1..m_K and n = n_1..n_K is reshaped to a K-way tensor
whose k-th index pairs row digit i_k with column digit j_k (size m_k n_k), the
layout CompactifAI (Tomut et al. 2024) uses for MPO layers. The singular values of
the unfolding at bond k (first k paired indices against the rest) are exactly the
bond spectrum that an untruncated TT-SVD (Oseledets 2011) produces there.

Truncating bond k to chi_k costs at most the tail energy of that unfolding, and the
TT-SVD errors add in squares, so choosing every chi_k so that its tail is below
eps / sqrt(K - 1) of ||W||_F guarantees a total relative error <= eps.
"""

from __future__ import annotations

import math

import numpy as np

from spectra.errors import SpectraInputError
from spectra.linalg import scratch
from spectra.linalg.svd import CHUNK_BYTES, gram_of_blocks, gram_spectrum

MIN_CORES, MAX_CORES = 2, 6


def factorize(d: int, k: int) -> tuple[int, ...]:
    """Split d into k ascending factors whose product is d, as equal as possible.

    Deterministic: among all non-decreasing factorizations, the one with the smallest
    largest factor wins, then the smallest spread (largest / smallest).
    """
    best: tuple[int, ...] | None = None

    def score(f):
        return (f[-1], f[-1] / f[0])

    def search(rest: int, left: int, lo: int, acc: tuple[int, ...]) -> None:
        nonlocal best
        if left == 1:
            if rest >= lo and (best is None or score(acc + (rest,)) < score(best)):
                best = acc + (rest,)
            return
        f = lo
        while f**left <= rest:
            if rest % f == 0:
                search(rest // f, left - 1, f, acc + (f,))
            f += 1

    search(d, k, 1, ())
    assert best is not None
    return best


def check_cores(k: int) -> None:
    if not MIN_CORES <= k <= MAX_CORES:
        raise SpectraInputError(
            f"cores={k}: the number of MPO cores must be in {MIN_CORES}..{MAX_CORES}"
        )


def full_bond_dims(mf: tuple[int, ...], nf: tuple[int, ...]) -> list[int]:
    """Bond dimensions of an exact MPO: min(left size, right size) at each bond."""
    sizes = [a * b for a, b in zip(mf, nf, strict=True)]
    return [
        min(math.prod(sizes[: k + 1]), math.prod(sizes[k + 1 :])) for k in range(len(sizes) - 1)
    ]


def paired(w, mf, nf):
    """Reshape (B, m, n) -> (B, m_1 n_1, ..., m_K n_K); numpy or torch."""
    b, k = w.shape[0], len(mf)
    t = w.reshape(b, *mf, *nf)
    axes = [0] + [a for i in range(k) for a in (1 + i, 1 + k + i)]
    t = t.permute(*axes) if hasattr(t, "permute") else t.transpose(axes)
    return t.reshape(b, *[x * y for x, y in zip(mf, nf, strict=True)])


def unfolding(w, mf, nf, bond: int):
    """The (B, prod_{<=bond} m_i n_i, rest) unfolding of a batch of matrices at `bond` (0-based)."""
    t = paired(w, mf, nf)
    left = math.prod(x * y for x, y in zip(mf[: bond + 1], nf[: bond + 1], strict=True))
    return t.reshape(t.shape[0], left, -1)


def bond_spectra(w: np.ndarray, mf, nf) -> list[np.ndarray]:
    """Singular values of every bond's unfolding of one matrix (K - 1 arrays, descending).

    Singular values do not depend on the order of the row or column indices of the
    unfolding, so bond k needs only W viewed as (m_<=k, m_>k, n_<=k, n_>k) with the two
    middle axes swapped. That reshuffle is never made whole: `bond_gram` sums the
    unfolding's smaller Gram from cache-sized reshuffled blocks (float64 even when `w`
    is float32), and only an ill-conditioned bond is reshuffled whole for an SVD.
    """
    m, n = w.shape
    out = []
    for k in range(1, len(mf)):
        ml, nl = math.prod(mf[:k]), math.prod(nf[:k])
        s = gram_spectrum(bond_gram(w, ml, nl))
        if s is None:
            u = _reshuffle(w, ml, m // ml, nl, n // nl)  # widened by the copy
            s = np.linalg.svd(u, compute_uv=False)
        out.append(s)
    return out


def bond_gram(w: np.ndarray, ml: int, nl: int) -> np.ndarray:
    """Smaller Gram of the (ml nl, mr nr) unfolding of W viewed as (ml, mr, nl, nr).

    Tall unfolding: blocks of whole m_<=k slices (rows of W) give whole rows of the
    unfolding, G = sum B^T B. Wide: blocks of m_>k slices give whole rows of its
    transpose, G = sum B B^T. Either way each block is one in-cache reshuffle.
    """
    m, n = w.shape
    mr, nr = m // ml, n // nl
    w4 = w.reshape(ml, mr, nl, nr)
    per = CHUNK_BYTES // 8
    if ml * nl >= mr * nr:
        step = max(1, per // (mr * n))
        blocks = (_block(w4[a : a + step].transpose(0, 2, 1, 3)) for a in range(0, ml, step))
    else:
        step = max(1, per // (ml * nl * nr))
        blocks = (_block(w4[:, c : c + step].transpose(0, 2, 1, 3)).T for c in range(0, mr, step))
    return gram_of_blocks(blocks)


def _block(view: np.ndarray) -> np.ndarray:
    """A 4-D view (a, b, c, d) copied (and widened) into float64 scratch as (a b, c d)."""
    buf = scratch.buffer("bond_block", view.size).reshape(view.shape)
    np.copyto(buf, view)
    return buf.reshape(view.shape[0] * view.shape[1], -1)


def _reshuffle(w: np.ndarray, ml: int, mr: int, nl: int, nr: int) -> np.ndarray:
    """(ml*mr, nl*nr) -> (ml*nl, mr*nr), [(a,b),(c,d)] -> [(a,c),(b,d)], in a reused
    float64 buffer (any float input is widened by the copy)."""
    buf = scratch.buffer("reshuffle", w.size)
    out = buf.reshape(ml, nl, mr, nr)
    np.copyto(out, w.reshape(ml, mr, nl, nr).transpose(0, 2, 1, 3))
    return buf.reshape(ml * nl, mr * nr)


def entropy(s: np.ndarray) -> float:
    """Entanglement (von Neumann) entropy of a bond: -sum p log p, p = s^2 / sum s^2."""
    p = np.asarray(s, dtype=np.float64) ** 2
    total = p.sum()
    if total == 0:
        return 0.0
    p = p[p > 0] / total
    return float(-(p * np.log(p)).sum())


def chi_for_eps(spectra: list[np.ndarray], eps: float) -> list[int]:
    """Per-bond dimension that keeps the TT-SVD reconstruction within relative error eps."""
    if not spectra:
        return []
    tol2 = eps**2 / len(spectra)  # per bond: (eps / sqrt(K - 1))^2
    out = []
    for s in spectra:
        s2 = np.asarray(s, dtype=np.float64) ** 2
        total = s2.sum()
        tail = np.concatenate([np.cumsum(s2[::-1])[::-1], [0.0]])  # tail[r] = sum_{i>=r}
        out.append(int(np.argmax(tail <= tol2 * total * (1 + 1e-12))) if total > 0 else 0)
    return out


def mpo_params(mf, nf, ranks) -> int:
    """Parameters of MPO cores (r_{k-1}, m_k, n_k, r_k) with the given bond ranks."""
    r = [1, *ranks, 1]
    return sum(r[k] * mf[k] * nf[k] * r[k + 1] for k in range(len(mf)))


def params_at_chi(mf, nf, chi: int) -> int:
    """Parameters of the MPO when every bond is capped at `chi`."""
    return mpo_params(mf, nf, [min(chi, d) for d in full_bond_dims(mf, nf)])


def chi_for_ratio(mf, nf, ratio: float) -> int:
    """Largest max bond dimension whose MPO has at most ratio * m * n parameters (0 if none)."""
    budget = ratio * math.prod(mf) * math.prod(nf)
    lo, hi = 0, max(full_bond_dims(mf, nf), default=1)
    while lo < hi:  # params_at_chi is non-decreasing in chi
        mid = (lo + hi + 1) // 2
        if params_at_chi(mf, nf, mid) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo


def tt_svd(w, mf, nf, ranks=None, eps: float | None = None) -> list:
    """TT-SVD of a matrix into K cores of shape (r_{k-1}, m_k, n_k, r_k).

    `ranks` caps each bond (an int caps all of them); `eps` picks per-bond ranks by
    chi_for_eps. With neither, the decomposition is exact. A torch tensor is
    decomposed in torch on its own device (float64), giving torch cores; anything
    else in numpy's float64, giving numpy cores (one algorithm, either library).
    """
    import torch

    k = len(mf)
    on_torch = torch.is_tensor(w)
    t = w.detach().to(torch.float64) if on_torch else torch.from_numpy(np.asarray(w, np.float64))
    if eps is not None:
        ranks = chi_for_eps(bond_spectra(t.cpu().numpy(), mf, nf), eps)
    elif ranks is None:
        ranks = full_bond_dims(mf, nf)
    elif isinstance(ranks, int):
        ranks = [ranks] * (k - 1)
    cores, r_prev = [], 1
    c = paired(t[None], mf, nf)[0].reshape(1, -1)
    for i in range(k - 1):
        c = c.reshape(r_prev * mf[i] * nf[i], -1)
        u, s, vt = torch.linalg.svd(c, full_matrices=False)
        r = max(1, min(ranks[i], s.numel()))
        cores.append(u[:, :r].reshape(r_prev, mf[i], nf[i], r))
        c = s[:r, None] * vt[:r]
        r_prev = r
    cores.append(c.reshape(r_prev, mf[-1], nf[-1], 1))
    return cores if on_torch else [x.numpy() for x in cores]


def tt_to_dense(cores: list):
    """Contract MPO cores (r, m_k, n_k, r') back to the (m, n) matrix (torch cores give
    a torch matrix on their device, numpy cores a numpy one)."""
    import torch

    on_torch = torch.is_tensor(cores[0])
    ts = cores if on_torch else [torch.from_numpy(np.asarray(c)) for c in cores]
    t = ts[0]  # (1, M, N, r)
    for c in ts[1:]:
        _, mm, nn, _ = t.shape
        _, a, b, r = c.shape
        t = torch.einsum("xmnr,rabs->xmanbs", t, c).reshape(1, mm * a, nn * b, r)
    out = t[0, :, :, 0]
    return out if on_torch else out.numpy()
