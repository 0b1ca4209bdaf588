"""MPO cores as a matrix (`dense`, differentiable) and their calibrated refinement:
alternating least squares on tr((T - M) H (T - M)^T), each core by conjugate gradients
with the cores around it kept orthogonal (compressors.mpo's calibrated form)."""

from __future__ import annotations

import torch

CG_STEPS = 6  # conjugate-gradient steps per core and sweep


def dense(cores: list[torch.Tensor]) -> torch.Tensor:
    """The (m, n) matrix of MPO cores (r, m_k, n_k, r'), differentiable (torch)."""
    t = cores[0]
    for c in cores[1:]:
        _, mm, nn_, _ = t.shape
        _, a, b, r = c.shape
        t = torch.einsum("xmnr,rabs->xmanbs", t, c).reshape(1, mm * a, nn_ * b, r)
    return t[0, :, :, 0]


def refine(cores, target: torch.Tensor, h: torch.Tensor, sweeps: int, steps: int = CG_STEPS):
    """Cores lowering tr((T - M) H (T - M)^T), M = dense(cores), by ALS sweeps (float64).

    Cores right of the one being updated are kept right-orthogonal and those left of it
    left-orthogonal, so each core's normal operator is as well conditioned as H allows.
    """
    cores = [c.to(torch.float64).clone() for c in cores]
    k = len(cores)
    for i in range(k - 1, 0, -1):  # right-orthogonalise: the centre moves to core 0
        cores[i - 1], cores[i] = _shift_left(cores[i - 1], cores[i])
    th = target @ h
    for _ in range(sweeps):
        for i in range(k):
            cores[i] = _cg(cores, i, th, h, steps)
            if i < k - 1:
                cores[i], cores[i + 1] = _shift_right(cores[i], cores[i + 1])
        for i in range(k - 1, 0, -1):
            cores[i - 1], cores[i] = _shift_left(cores[i - 1], cores[i])
    return cores


def _cg(cores, i: int, th: torch.Tensor, h: torch.Tensor, steps: int) -> torch.Tensor:
    """Core i after `steps` CG steps on min_G tr((T - A(G)) H (T - A(G))^T)."""

    def adjoint(y: torch.Tensor) -> torch.Tensor:  # A*(Y) = d <A(G), Y> / dG
        g = cores[i].detach().requires_grad_(True)
        m = dense([*cores[:i], g, *cores[i + 1 :]])
        return torch.autograd.grad(m, g, grad_outputs=y)[0]

    def normal(g: torch.Tensor) -> torch.Tensor:  # A*(A(G) H)
        with torch.no_grad():
            m = dense([*cores[:i], g, *cores[i + 1 :]])
        return adjoint(m @ h)

    g = cores[i]
    r = adjoint(th) - normal(g)
    p, rr = r, float((r * r).sum())
    for _ in range(steps):
        if rr <= 1e-30:
            break
        q = normal(p)
        pq = float((p * q).sum())
        if pq <= 0:
            break
        alpha = rr / pq
        g = g + alpha * p
        r = r - alpha * q
        rr, old = float((r * r).sum()), rr
        p = r + (rr / old) * p
    return g.detach()


def _shift_right(c: torch.Tensor, nxt: torch.Tensor):
    """(left-orthogonal c, nxt carrying the rest): QR of c's (r m n, r') unfolding."""
    r, mk, nk, r2 = c.shape
    q, rr = torch.linalg.qr(c.reshape(r * mk * nk, r2))
    nxt = (rr @ nxt.reshape(r2, -1)).reshape(rr.shape[0], *nxt.shape[1:])
    return q.reshape(r, mk, nk, q.shape[1]), nxt


def _shift_left(prev: torch.Tensor, c: torch.Tensor):
    """(prev carrying the rest, right-orthogonal c): QR of c's transposed unfolding."""
    r, mk, nk, r2 = c.shape
    q, rr = torch.linalg.qr(c.reshape(r, mk * nk * r2).T)
    prev = (prev.reshape(-1, r) @ rr.T).reshape(*prev.shape[:3], rr.shape[0])
    return prev, q.T.reshape(q.shape[1], mk, nk, r2)
