"""Unstructured magnitude pruning (the classic baseline; Han et al. 2015).

The `sparsity` fraction of entries with the smallest |W| in the matrix is set to
zero and the rest kept in CSR form.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from compressors.base import Calibration, Factorization, config_error
from compressors.sparse import CSR, SparseLinear, top_k_mask


@dataclass(frozen=True)
class PruneConfig:
    """Settings of `prune`.

    Attributes:
        sparsity: fraction of weights set to zero, in [0, 1).
    """

    method: ClassVar[str] = "prune"
    sparsity: float = 0.5

    def __post_init__(self):
        if not 0 <= self.sparsity < 1:
            raise config_error(self.method, "sparsity", self.sparsity, "must be in [0, 1)")

    def check_shape(self, m: int, n: int) -> None:
        pass


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
    """Keep the largest-|W| (1 - sparsity) fraction of entries."""
    w = weight.detach()
    keep = top_k_mask(w.abs().to(torch.float64), round((1 - config.sparsity) * w.numel()))
    return Pruned(CSR.from_dense(w, keep))
