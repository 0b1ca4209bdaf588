"""Unstructured pruning baselines: magnitude (Han et al. 2015) and Wanda (Sun et al. 2023).

Magnitude: the `sparsity` fraction of entries with the smallest |W| in the matrix
is set to zero. Wanda: entries are scored |W_ij| * ||X_j||_2 with the calibration
activations' input-feature norms, and each output row drops its lowest-scoring
`sparsity` fraction (the paper's per-output comparison group). Kept entries are
stored in CSR form.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from compressors.base import DENSE_BITS, Calibration, Factorization, config_error, csr_index_bits
from compressors.sparse import CSR, SparseLinear, top_k_mask


@dataclass(frozen=True)
class PruneConfig:
    """Settings of `prune`.

    Attributes:
        sparsity: fraction of weights set to zero, in [0, 1).
        wanda: score by |W| times activation norm, per output row (needs calibration).
    """

    method: ClassVar[str] = "prune"
    sparsity: float = 0.5
    wanda: bool = False

    def __post_init__(self):
        if not 0 <= self.sparsity < 1:
            raise config_error(self.method, "sparsity", self.sparsity, "must be in [0, 1)")

    def check_shape(self, m: int, n: int) -> None:
        pass

    def cost(self, m: int, n: int) -> tuple[int, int]:
        nnz = (
            round((1 - self.sparsity) * n) * m if self.wanda else round((1 - self.sparsity) * m * n)
        )
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
    """Keep the largest-|W| (1 - sparsity) fraction, or Wanda's top scores per row."""
    w = weight.detach()
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
