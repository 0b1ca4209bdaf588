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
from spectra.linalg import mpo as tt


@dataclass(frozen=True)
class MPOConfig:
    """Settings of `mpo`.

    Attributes:
        cores: number of MPO cores K (2..6); m and n are factored as spectra.linalg.mpo.factorize.
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
    """y = W x + b with W held as MPO cores, contracted one core at a time.

    The contraction runs from the first core or from the last, whichever needs fewer
    multiplications per token for these bond dimensions (up to 1.75x apart on the
    demo's 576 x 1536 shapes); from the last, the input's column factors and the
    output's row factors are taken in reverse order and the cores with their bonds
    swapped, which is the same product.
    """

    def __init__(self, cores, bias=None):
        super().__init__()
        self.cores = nn.ParameterList([nn.Parameter(c, requires_grad=False) for c in cores])
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.mf = [c.shape[1] for c in cores]
        self.nf = [c.shape[2] for c in cores]
        self.reverse = contraction_cost(cores, reverse=True) < contraction_cost(cores)
        for i, c in enumerate(reversed(cores) if self.reverse else ()):
            self.register_buffer(f"_rev{i}", c.permute(3, 1, 2, 0).contiguous(), persistent=False)

    def forward(self, x):
        lead, k = x.shape[:-1], len(self.cores)
        if not self.reverse:
            y = _contract(x.reshape(-1, x.shape[-1]), list(self.cores))
        else:
            flip = [0, *range(k, 0, -1)]
            xr = x.reshape(-1, *self.nf).permute(*flip).reshape(-1, x.shape[-1])
            cores = [getattr(self, f"_rev{i}") for i in range(k)]
            y = _contract(xr, cores).reshape(-1, *self.mf[::-1]).permute(*flip)
        y = y.reshape(*lead, -1)
        return y if self.bias is None else y + self.bias


def _contract(x, cores):
    """(B, n) -> (B, m) through cores (r_{k-1}, m_k, n_k, r_k), first core first."""
    state = x.reshape(x.shape[0], 1, 1, x.shape[-1])  # (B, rows done, bond, columns left)
    for core in cores:
        b, done, r, left = state.shape
        _, mk, nk, r2 = core.shape
        state = state.reshape(b, done, r, nk, left // nk)
        state = torch.einsum("bdrnz,rmns->bdmsz", state, core)
        state = state.reshape(b, done * mk, r2, left // nk)
    return state.reshape(x.shape[0], -1)


def contraction_cost(cores, reverse: bool = False) -> int:
    """Multiplications per input row of the one-core-at-a-time contraction."""
    shapes = [tuple(c.shape) for c in cores]
    if reverse:
        shapes = [(s[3], s[1], s[2], s[0]) for s in reversed(shapes)]
    done, left = 1, math.prod(s[2] for s in shapes)
    total = 0
    for r, mk, nk, r2 in shapes:
        total += done * r * left * mk * r2
        done, left = done * mk, left // nk
    return total


def compress(weight: torch.Tensor, config: MPOConfig, calib: Calibration | None = None) -> MPO:
    """TT-SVD of `weight` into `cores` cores, bonds capped at `bond_dim`."""
    m, n = weight.shape
    mf, nf = tt.factorize(m, config.cores), tt.factorize(n, config.cores)
    w = weight.detach().to(torch.float64).numpy()
    cores = tt.tt_svd(np.ascontiguousarray(w), mf, nf, ranks=config.bond_dim)
    return MPO([torch.from_numpy(c).to(weight.dtype) for c in cores])
