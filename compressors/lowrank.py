"""Low-rank SVD: W ~ A B with A (m, r), B (r, n).

Plain: the truncated SVD, optimal in Frobenius and spectral norm (Eckart-Young).
Whitened (`whiten: true`, SVD-LLM, Wang et al. 2024): with calibration activations
X and H = X^T X = L L^T (Cholesky), the rank-r W' minimising ||(W - W') X^T||_F is
trunc_r(W L) L^{-1}. When H is not positive definite a growing multiple of its mean
diagonal is added until the Cholesky succeeds (the jitter is recorded).
`factor_bits` < 16 stores A and B as group-wise codes (compressors.factors).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from compressors import factors
from compressors.base import (
    Calibration,
    Factorization,
    check_rank,
    config_error,
    whitening_factor,
)
from spectra.linalg.metrics import energy_rank


@dataclass(frozen=True)
class LowRankConfig:
    """Settings of `lowrank`.

    Attributes:
        rank: kept rank r (1..min(m, n)); give this or `energy`.
        energy: keep the smallest rank whose share of ||W||_F^2 reaches this fraction,
            in (0, 1]. Always the weight's own spectrum, also when whitened, so that a
            plan's budget is known from the spectra before any calibration.
        whiten: activation-aware truncation (needs calibration data).
        factor_bits: bits per entry of A and B, 2..8, or 16 (unquantized).
        factor_group_size: entries sharing a scale and zero point along a factor's rows.
    """

    method: ClassVar[str] = "lowrank"
    rank: int | None = None
    energy: float | None = None
    whiten: bool = False
    factor_bits: int = 16
    factor_group_size: int = 64

    def __post_init__(self):
        if (self.rank is None) == (self.energy is None):
            raise config_error(self.method, "rank", self.rank, "give exactly one of rank or energy")
        if self.rank is not None and (not isinstance(self.rank, int) or self.rank < 1):
            raise config_error(self.method, "rank", self.rank, "must be an integer >= 1")
        if self.energy is not None and not 0 < self.energy <= 1:
            raise config_error(self.method, "energy", self.energy, "must be in (0, 1]")
        factors.check(self.method, self.factor_bits, self.factor_group_size)

    def check_shape(self, m: int, n: int) -> None:
        if self.rank is not None:
            check_rank(self.method, self.rank, m, n)

    def cost(self, m: int, n: int, rank: int | None = None) -> tuple[int, int]:
        """(parameters, bits) for an (m, n) weight; `rank` resolves an `energy` setting."""
        r = self.rank if self.rank is not None else rank
        if r is None:
            raise ValueError("an energy setting needs the spectrum to know its rank")
        fb, gs = self.factor_bits, self.factor_group_size
        return r * (m + n), factors.factor_cost((m, r), fb, gs) + factors.factor_cost(
            (r, n), fb, gs
        )


@dataclass
class LowRank(Factorization):
    a: torch.Tensor | factors.QuantizedFactor  # (m, r)
    b: torch.Tensor | factors.QuantizedFactor  # (r, n)

    @property
    def shape(self):
        return (self.a.shape[0], self.b.shape[1])

    @property
    def rank(self) -> int:
        return self.a.shape[1]

    def to_dense(self):
        return factors.dense(self.a) @ factors.dense(self.b)

    @property
    def n_params(self):
        return self.rank * (self.shape[0] + self.shape[1])

    @property
    def bits(self):
        return factors.bits_of(self.a) + factors.bits_of(self.b)

    def as_module(self, bias=None):
        return LowRankLinear(self.a, self.b, bias)


class LowRankLinear(nn.Module):
    """y = (x B^T) A^T + b: two thin products, W never formed (quantized factors are
    dequantized in the forward)."""

    def __init__(self, a, b, bias=None):
        super().__init__()
        factors.hold(self, "a", a)
        factors.hold(self, "b", b)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def forward(self, x):
        a, b = factors.value(self, "a").to(x.dtype), factors.value(self, "b").to(x.dtype)
        return nn.functional.linear(nn.functional.linear(x, b), a, self.bias)


def compress(
    weight: torch.Tensor, config: LowRankConfig, calib: Calibration | None = None
) -> LowRank:
    """Truncated (optionally whitened) SVD of `weight` (out, in)."""
    m, n = weight.shape
    config.check_shape(m, n)
    w = weight.detach().to(torch.float64)
    r = config.rank
    if r is None:
        r = energy_rank(torch.linalg.svdvals(w).numpy(), config.energy)
    chol = None
    if config.whiten:
        chol = whitening_factor("lowrank", calib)
        w = w @ chol
    u, s, vt = torch.linalg.svd(w, full_matrices=False)
    root = s[:r].sqrt()
    a, b = u[:, :r] * root, root[:, None] * vt[:r]
    if chol is not None:  # B L^{-1}: solve X L = B
        b = torch.linalg.solve_triangular(chol, b, upper=False, left=False)
    fb, gs = config.factor_bits, config.factor_group_size
    return LowRank(
        factors.quantize_factor(a.to(weight.dtype), fb, gs),
        factors.quantize_factor(b.to(weight.dtype), fb, gs),
    )
