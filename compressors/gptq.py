"""GPTQ / LDLQ (Frantar et al. 2022; Chee et al. 2023): columns quantized in order, each
one's rounding error pushed onto the columns not yet quantized through the upper
Cholesky factor of H^-1 (see compressors.quant's docstring for the grid, lazy batches
and act-order)."""

from __future__ import annotations

import math

import torch

from compressors.base import hessian_inverse_factor
from compressors.grids import grid, group_grid


def act_order_perm(h: torch.Tensor) -> torch.Tensor:
    """Input columns in decreasing diag(H) (ties in column order)."""
    return torch.sort(-torch.diagonal(h).to(torch.float64), stable=True).indices


def ldlq(
    w: torch.Tensor,
    h: torch.Tensor,
    bits: int,
    group_size: int,
    block: int = 128,
    factor: tuple[torch.Tensor, torch.Tensor] | None = None,
    act_order: bool = False,
    symmetric: bool = False,
    observer: str = "minmax",
):
    """GPTQ/LDLQ: (codes, scales, zeros) of w (m, n) under the Hessian h (n, n) on w's
    device: uint8 codes, float64 grid, computed in float64.

    `factor` is hessian_inverse_factor(h) (with perm=act_order_perm(h) under
    `act_order`), when the caller quantizes several matrices under the same Hessian.

    The column loop runs on the transposed weight (a column is a contiguous row). Inside
    a block it is left-looking: a column gathers the pending updates of the earlier
    columns of its group when it is reached (one vector-matrix product), and a group
    gathers those of the block's earlier groups when its grid is set (one matrix
    product); the block's errors reach the later blocks in one product. Same arithmetic
    as the right-looking form, about 4x less memory traffic.
    """
    m, n = w.shape
    if act_order:
        return _ldlq_act_order(w, h, bits, group_size, block, factor, symmetric, observer)
    # blocks hold whole groups, so a group's grid never reads columns whose lazy update
    # from an earlier block is still pending
    block = max(group_size, block // group_size * group_size)
    dev, f64 = w.device, torch.float64
    u_t, dead = factor if factor is not None else hessian_inverse_factor(h)
    u = u_t.to(dev, f64)
    diag = torch.diagonal(u)
    wt = torch.empty(n, m, dtype=f64, device=dev)
    wt.copy_(w.detach().T)
    wt[dead.to(dev)] = 0
    groups = math.ceil(n / group_size)
    scale = torch.ones(groups, m, dtype=f64, device=dev)
    zero = torch.zeros(groups, m, dtype=f64, device=dev)
    codes = torch.zeros(n, m, dtype=torch.uint8, device=dev)
    top = 2**bits - 1
    hd = torch.diagonal(h).to(dev, f64)
    for b0 in range(0, n, block):
        b1 = min(b0 + block, n)
        err = torch.empty(b1 - b0, m, dtype=f64, device=dev)
        for g0 in range(b0, b1, group_size):
            g1 = min(g0 + group_size, n)
            if g0 > b0:
                wt[g0:g1] -= u[b0:g0, g0:g1].T @ err[: g0 - b0]
            # the group's grid, from the weights as updated so far
            s, z = group_grid(wt[g0:g1].T, bits, symmetric, observer, hd[g0:g1])
            scale[g0 // group_size], zero[g0 // group_size] = s, z
            _columns(wt, u, diag, err, codes, s, z, top, g0, g1, b0)
        if b1 < n:
            wt[b1:].addmm_(u[b0:b1, b1:].T, err, alpha=-1)  # in place: no (n, m) temporary
    return codes.T.contiguous(), scale.T.contiguous(), zero.T.contiguous()


def _columns(wt, u, diag, err, codes, s, z, top, c0, c1, b0):
    """Quantize columns c0..c1-1 (rows of wt) on the grid (s, z), left-looking from c0:
    each column takes the pending updates of the earlier ones, its error goes to err.
    Few, in-place operations per column: on the CPU their overhead is the cost."""
    for i in range(c0, c1):
        col = (
            wt[i] if i == c0 else torch.addmv(wt[i], err[c0 - b0 : i - b0].T, u[c0:i, i], alpha=-1)
        )
        q = torch.round(col / s).add_(z).clamp_(0, top)
        codes[i] = q
        torch.sub(col, (q - z).mul_(s), out=err[i - b0]).div_(diag[i])


def _ldlq_act_order(w, h, bits, group_size, block, factor, symmetric, observer):
    """GPTQ over the columns in decreasing diag(H), each column on its group's grid
    fixed from the original weights; codes returned in the original column order.

    Working set beside the factor: the weights once, transposed in float64 (an 8B
    model's down_proj: 0.47 GB), and uint8 codes; each column reads its group's row of
    the grid instead of an (n, m) gather of it."""
    m, n = w.shape
    dev, f64 = w.device, torch.float64
    perm = act_order_perm(h).to(dev)
    # (m, groups), from the original weights: before the factor, so that its float64
    # transients are gone by the time the factor's are made
    scale, zero = grid(w.detach().to(f64), bits, group_size, symmetric, observer, torch.diagonal(h))
    u_t, dead = factor if factor is not None else hessian_inverse_factor(h, perm=perm)
    group_of = (perm // group_size).tolist()  # processing position -> its column's group
    s_t, z_t = scale.T.contiguous(), zero.T.contiguous()  # (groups, m)
    u = u_t.to(dev, f64)
    diag = torch.diagonal(u)
    wt = torch.empty(n, m, dtype=f64, device=dev)  # processing order
    wt.copy_(w.detach().T[perm])
    wt[dead.to(dev)] = 0
    codes = torch.empty(n, m, dtype=torch.uint8, device=dev)
    top = 2**bits - 1
    for b0 in range(0, n, block):
        b1 = min(b0 + block, n)
        err = torch.empty(b1 - b0, m, dtype=f64, device=dev)
        for i in range(b0, b1):  # left-looking within the block, as in ldlq
            s, z = s_t[group_of[i]], z_t[group_of[i]]
            col = wt[i] if i == b0 else torch.addmv(wt[i], err[: i - b0].T, u[b0:i, i], alpha=-1)
            q = torch.round(col / s).add_(z).clamp_(0, top)
            codes[i] = q
            torch.sub(col, (q - z).mul_(s), out=err[i - b0]).div_(diag[i])
        if b1 < n:
            wt[b1:].addmm_(u[b0:b1, b1:].T, err, alpha=-1)  # in place: no (n, m) temporary
    del wt
    out = torch.empty_like(codes)
    out[perm] = codes
    return out.T.contiguous(), scale, zero
