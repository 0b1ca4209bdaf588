"""Unstructured pruning baselines: magnitude (Han et al. 2015) and Wanda (Sun et al. 2023).

Magnitude: the `sparsity` fraction of entries with the smallest |W| in the matrix
is set to zero. Wanda: entries are scored |W_ij| * ||X_j||_2 with the calibration
activations' input-feature norms, and each output row drops its lowest-scoring
`sparsity` fraction (the paper's per-output comparison group). Kept entries are
stored in CSR form.

SparseGPT (Frantar & Alistarh 2023): the OBS reconstruction of GPTQ with pruning
instead of rounding. With U the upper Cholesky factor of (H + 1% mean diag)^-1,
columns are visited in blocks of 128; at a block's start its mask is chosen on the
weights as updated so far (adaptive mask selection), pruning the entries of least
saliency w^2 / U_ii^2, exactly round(sparsity * rows * width) of the block (the
reference takes a threshold; a count keeps the cost exact); then column by column a
pruned entry's value, divided by U_ii, is pushed onto the later columns of its row
through U's row, which minimises ||(W - W_hat) X^T||_F greedily; the block's errors
reach later blocks in one product ("lazy batch"). Kept entries carry the updated
values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from compressors.base import DENSE_BITS, Calibration, Factorization, config_error, csr_index_bits
from compressors.sparse import CSR, SparseLinear, top_k_mask

SPARSEGPT_BLOCK = 128  # columns per mask-selection block (the reference's blocksize)


@dataclass(frozen=True)
class PruneConfig:
    """Settings of `prune`.

    Attributes:
        sparsity: fraction of weights set to zero, in [0, 1).
        wanda: score by |W| times activation norm, per output row (needs calibration).
        sparsegpt: SparseGPT's OBS reconstruction under H (needs calibration).
    """

    method: ClassVar[str] = "prune"
    sparsity: float = 0.5
    wanda: bool = False
    sparsegpt: bool = False

    def __post_init__(self):
        if not 0 <= self.sparsity < 1:
            raise config_error(self.method, "sparsity", self.sparsity, "must be in [0, 1)")
        if self.wanda and self.sparsegpt:
            raise config_error(self.method, "sparsegpt", True, "choose wanda or sparsegpt")

    def check_shape(self, m: int, n: int) -> None:
        pass

    def cost(self, m: int, n: int) -> tuple[int, int]:
        if self.wanda:
            nnz = round((1 - self.sparsity) * n) * m
        elif self.sparsegpt:
            nnz = sum(
                m * w - round(self.sparsity * m * w)
                for w in (min(SPARSEGPT_BLOCK, n - lo) for lo in range(0, n, SPARSEGPT_BLOCK))
            )
        else:
            nnz = round((1 - self.sparsity) * m * n)
        return nnz, DENSE_BITS * nnz + csr_index_bits(m, n, nnz)


@dataclass
class Pruned(Factorization):
    s: CSR

    @property
    def shape(self):
        return self.s.shape

    def to_dense(self):
        return self.s.to_dense()

    @property
    def n_params(self):
        return self.s.nnz

    @property
    def bits(self):
        return self.s.bits

    def as_module(self, bias=None):
        return SparseLinear(self.s, bias)


def compress(weight: torch.Tensor, config: PruneConfig, calib: Calibration | None = None):
    """Keep the largest-|W| (1 - sparsity) fraction, Wanda's top scores per row, or
    SparseGPT's reconstruction."""
    w = weight.detach()
    if config.sparsegpt:
        if calib is None:
            raise config_error("prune", "sparsegpt", True, "needs calibration data")
        values, keep = sparsegpt(w.to(torch.float64), calib.hessian, config.sparsity)
        return Pruned(CSR.from_dense(values.to(w.dtype), keep))
    if not config.wanda:
        keep = top_k_mask(w.abs().to(torch.float64), round((1 - config.sparsity) * w.numel()))
        return Pruned(CSR.from_dense(w, keep))
    if calib is None:
        raise config_error("prune", "wanda", True, "needs calibration data")
    score = w.abs().to(torch.float64) * calib.col_norms[None, :]
    k = round((1 - config.sparsity) * w.shape[1])
    keep = torch.zeros_like(score, dtype=torch.bool)
    if k > 0:
        keep.scatter_(1, torch.topk(score, k, dim=1).indices, True)
    return Pruned(CSR.from_dense(w, keep))


def sparsegpt(
    w: torch.Tensor, h: torch.Tensor, sparsity: float, block: int = SPARSEGPT_BLOCK
) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT: (reconstructed weights, keep mask) of w (m, n) under H (n, n)."""
    from compressors.quant import hessian_inverse_factor

    m, n = w.shape
    u, dead = hessian_inverse_factor(h)
    w = w.clone()
    w[:, dead] = 0
    keep = torch.ones(m, n, dtype=torch.bool)
    for b0 in range(0, n, block):
        b1 = min(b0 + block, n)
        w1, u1 = w[:, b0:b1], u[b0:b1, b0:b1]
        saliency = w1.pow(2) / torch.diagonal(u1).pow(2)[None, :]
        k = round(sparsity * saliency.numel())
        mask = ~top_k_mask(-saliency, k) if k else torch.ones_like(saliency, dtype=torch.bool)
        err = torch.zeros_like(w1)
        for i in range(b1 - b0):
            col = w1[:, i]
            q = torch.where(mask[:, i], col, torch.zeros_like(col))
            e = (col - q) / u1[i, i]
            w1[:, i:] -= e[:, None] * u1[i, i:][None, :]
            w1[:, i] = q
            err[:, i] = e
        keep[:, b0:b1] = mask
        if b1 < n:
            w[:, b1:] -= err @ u[b0:b1, b1:]
    return w * keep, keep
