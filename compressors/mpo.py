"""Matrix product operator (tensor-train) layers (CompactifAI, Tomut et al. 2024).

W (m, n) with m = m_1..m_K, n = n_1..n_K is reshaped so that core k carries the
paired index (i_k, j_k), and decomposed by TT-SVD (Oseledets 2011) with every bond
truncated to at most `bond_dim`. CompactifAI then heals the model by brief
retraining; this post-training form stops at the truncated TT-SVD. The forward
contracts the input with one core at a time and never forms W.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from torch import nn

from compressors.base import DENSE_BITS, Calibration, Factorization, config_error
from spectra import mpo as tt


@dataclass(frozen=True)
class MPOConfig:
    """Settings of `mpo`.

    Attributes:
        cores: number of MPO cores K (2..6); m and n are factored as spectra.mpo.factorize.
        bond_dim: maximum bond dimension chi (>= 1).
    """

    method: ClassVar[str] = "mpo"
    cores: int = 3
    bond_dim: int = 32

    def __post_init__(self):
        if not isinstance(self.cores, int) or not tt.MIN_CORES <= self.cores <= tt.MAX_CORES:
            raise config_error(
                self.method, "cores", self.cores, f"must be in {tt.MIN_CORES}..{tt.MAX_CORES}"
            )
        if not isinstance(self.bond_dim, int) or self.bond_dim < 1:
            raise config_error(self.method, "bond_dim", self.bond_dim, "must be an integer >= 1")

    def check_shape(self, m: int, n: int) -> None:
        pass  # any bond_dim is valid: bonds are capped at their full dimension

    def cost(self, m: int, n: int) -> tuple[int, int]:
        mf, nf = tt.factorize(m, self.cores), tt.factorize(n, self.cores)
        p = tt.params_at_chi(mf, nf, self.bond_dim)
        return p, DENSE_BITS * p


@dataclass
class MPO(Factorization):
    cores: list[torch.Tensor]  # (r_{k-1}, m_k, n_k, r_k)

    @property
    def shape(self):
        return (
            math.prod(c.shape[1] for c in self.cores),
            math.prod(c.shape[2] for c in self.cores),
        )

    def to_dense(self):
        return torch.from_numpy(tt.tt_to_dense([c.double().numpy() for c in self.cores])).to(
            self.cores[0].dtype
        )

    @property
    def n_params(self):
        return sum(c.numel() for c in self.cores)

    @property
    def bits(self):
        return DENSE_BITS * self.n_params

    def as_module(self, bias=None):
        return MPOLinear(self.cores, bias)


class MPOLinear(nn.Module):
    """y = W x + b with W held as MPO cores; contracts one core at a time."""

    def __init__(self, cores, bias=None):
        super().__init__()
        self.cores = nn.ParameterList([nn.Parameter(c, requires_grad=False) for c in cores])
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def forward(self, x):
        lead = x.shape[:-1]
        state = x.reshape(-1, 1, 1, x.shape[-1])  # (B, rows done, bond, columns left)
        for core in self.cores:
            b, done, r, left = state.shape
            _, mk, nk, r2 = core.shape
            state = state.reshape(b, done, r, nk, left // nk)
            state = torch.einsum("bdrnz,rmns->bdmsz", state, core)
            state = state.reshape(b, done * mk, r2, left // nk)
        y = state.reshape(*lead, -1)
        return y if self.bias is None else y + self.bias


def compress(weight: torch.Tensor, config: MPOConfig, calib: Calibration | None = None) -> MPO:
    """TT-SVD of `weight` into `cores` cores, bonds capped at `bond_dim`."""
    m, n = weight.shape
    mf, nf = tt.factorize(m, config.cores), tt.factorize(n, config.cores)
    w = weight.detach().to(torch.float64).numpy()
    cores = tt.tt_svd(np.ascontiguousarray(w), mf, nf, ranks=config.bond_dim)
    return MPO([torch.from_numpy(c).to(weight.dtype) for c in cores])
