"""Sparse matrices in CSR form with exact storage accounting, shared by LoSparse and pruning."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import nn

from compressors.base import DENSE_BITS, csr_index_bits


@dataclass
class CSR:
    """A (rows, cols) sparse matrix: 16-bit values, column indices, 32-bit row pointers."""

    crow: torch.Tensor  # (rows + 1,) int64
    col: torch.Tensor  # (nnz,) int64
    values: torch.Tensor  # (nnz,)
    shape: tuple[int, int]

    @staticmethod
    def from_dense(dense: torch.Tensor, keep: torch.Tensor) -> CSR:
        """Keep the entries of `dense` where the boolean mask `keep` is True."""
        with warnings.catch_warnings():  # CSR support is "beta" in torch; it is what we need
            warnings.simplefilter("ignore")
            sp = (dense * keep).to_sparse_csr() if keep.any() else None
        if sp is None:
            rows = dense.shape[0]
            empty = torch.zeros(0, dtype=torch.int64, device=dense.device)
            return CSR(
                torch.zeros(rows + 1, dtype=torch.int64, device=dense.device),
                empty,
                dense.new_zeros(0),
                tuple(dense.shape),
            )
        # to_sparse_csr drops exact zeros inside the mask too: they cost nothing to drop
        return CSR(sp.crow_indices(), sp.col_indices(), sp.values(), tuple(dense.shape))

    @property
    def nnz(self) -> int:
        return int(self.values.numel())

    @property
    def bits(self) -> int:
        return DENSE_BITS * self.nnz + csr_index_bits(self.shape[0], self.shape[1], self.nnz)

    def torch_sparse(self) -> torch.Tensor:
        return torch.sparse_csr_tensor(
            self.crow, self.col, self.values, self.shape, check_invariants=False
        )

    def to_dense(self) -> torch.Tensor:
        return self.torch_sparse().to_dense()


def top_k_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the k largest entries of `scores` (ties broken by position)."""
    mask = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    if k > 0:
        mask[torch.topk(scores.reshape(-1), k, sorted=False).indices] = True
    return mask.reshape(scores.shape)


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Boolean mask keeping the n largest of every m consecutive entries of each row."""
    rows, cols = scores.shape
    groups = scores.reshape(rows, cols // m, m)
    mask = torch.zeros_like(groups, dtype=torch.bool)
    mask.scatter_(2, torch.topk(groups, n, dim=2).indices, True)
    return mask.reshape(rows, cols)


class SparseLinear(torch.nn.Module):
    """y = x S^T + b with S kept in CSR."""

    def __init__(self, s: CSR, bias: torch.Tensor | None):
        super().__init__()
        self.register_buffer("weight_csr", s.torch_sparse())
        self.bias = None if bias is None else torch.nn.Parameter(bias, requires_grad=False)

    def forward(self, x):
        flat = x.reshape(-1, x.shape[-1])
        y = (self.weight_csr @ flat.T).T
        y = y.reshape(*x.shape[:-1], y.shape[-1])
        return y if self.bias is None else y + self.bias


class TrainableSparseLinear(nn.Module):
    """y = x S^T + b with S's values a parameter on S's fixed support (for healing).

    The values share the CSR's tensor, so training updates the factorization in place;
    the forward scatters them into a dense matrix (differentiable in the values).
    """

    def __init__(self, s: CSR, bias: torch.Tensor | None = None):
        super().__init__()
        self.shape = s.shape
        rows = torch.repeat_interleave(
            torch.arange(s.shape[0], device=s.crow.device), s.crow.diff()
        )
        self.register_buffer("rows", rows, persistent=False)
        self.register_buffer("cols", s.col, persistent=False)
        self.values = nn.Parameter(s.values)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def forward(self, x):
        w = x.new_zeros(self.shape).index_put((self.rows, self.cols), self.values.to(x.dtype))
        return nn.functional.linear(x, w, self.bias)
