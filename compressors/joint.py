"""Data-free joint rank-k approximation (Peng et al. 2024).

Matrices that read the same input (q, k, v under one attention; gate, up under one
MLP) are stacked by rows, W = [W_1; ...; W_g] (sum m_i, n). The top-k right
singular vectors V (n, k) of the stack span the input directions that matter most
to the group as a whole; each member keeps A_i = W_i V (m_i, k) and W_i ~ A_i V^T.
Parameters: k (n + sum m_i), against k (n + m_i) per member when each is truncated
alone. The group's forward computes z = V^T x once and y_i = A_i z per member.

Whitened (`whiten: true`): the members read one input X, so one H = X^T X = L L^T
serves the group. The objective sum_i ||(W_i - A_i V^T) X^T||_F^2 = ||[W_i L] -
[A_i] V^T L||_F^2 is minimised over a shared row space by the top-k right singular
vectors Q (n, k) of the stacked [W_i L]: V = L^{-T} Q and A_i = W_i L Q. With one
member this is whitened low rank (SVD-LLM); stored form and cost are unchanged.
`factor_bits` < 16 stores V and every A_i as group-wise codes (compressors.factors).
"""

from __future__ import annotations

import weakref
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
    require_int,
    whitening_factor,
)


@dataclass(frozen=True)
class JointConfig:
    """Settings of `joint`.

    Attributes:
        rank: shared rank k (1..min(sum m_i, n)).
        whiten: activation-aware shared basis (needs calibration data).
        factor_bits: bits per entry of V and the A_i, 2..8, or 16 (unquantized).
        factor_group_size: entries sharing a scale and zero point along a factor's rows.
    """

    method: ClassVar[str] = "joint"
    rank: int = 64
    whiten: bool = False
    factor_bits: int = 16
    factor_group_size: int = 64

    def __post_init__(self):
        require_int(self.method, "rank", self.rank, 1)
        factors.check(self.method, self.factor_bits, self.factor_group_size)

    def check_shape(self, m: int, n: int) -> None:
        check_rank(self.method, self.rank, m, n)

    def cost(self, m: int, n: int) -> tuple[int, int]:
        """(parameters, bits) of a group whose stacked rows number m (sum of m_i): the
        A_i are grouped along their rows, so their codes cost what the stack's would."""
        k, fb, gs = self.rank, self.factor_bits, self.factor_group_size
        return k * (m + n), factors.factor_cost((n, k), fb, gs) + factors.factor_cost(
            (m, k), fb, gs
        )


@dataclass
class JointGroup(Factorization):
    v: torch.Tensor | factors.QuantizedFactor  # (n, k), shared
    a: list  # (m_i, k) per member, tensors or QuantizedFactors

    @property
    def shape(self):
        return (sum(x.shape[0] for x in self.a), self.v.shape[0])

    @property
    def rank(self) -> int:
        return self.v.shape[1]

    def member_dense(self, i: int) -> torch.Tensor:
        return factors.dense(self.a[i]) @ factors.dense(self.v).T

    def to_dense(self):
        v = factors.dense(self.v)
        return torch.cat([factors.dense(x) @ v.T for x in self.a])

    @property
    def n_params(self):
        return self.rank * sum(self.shape)

    @property
    def bits(self):
        return factors.bits_of(self.v) + sum(factors.bits_of(x) for x in self.a)

    def member_modules(self, biases=None) -> list[nn.Module]:
        """One module per member, all sharing one projection z = V^T x."""
        shared = SharedProjection(self.v)
        biases = biases or [None] * len(self.a)
        return [JointMemberLinear(shared, a, b) for a, b in zip(self.a, biases, strict=True)]

    def as_module(self, bias=None):
        """The whole stack as one module (outputs concatenated), for a single-matrix group."""
        return JointMemberLinear(SharedProjection(self.v), factors.stack_rows(self.a), bias)


class SharedProjection(nn.Module):
    """z = x V, remembered for the last input object so group members compute it once."""

    def __init__(self, v):
        super().__init__()
        factors.hold(self, "v", v)
        self._last: tuple | None = None
        self.computed = 0  # how many projections were actually computed (for tests)

    def forward(self, x):
        last = self._last
        if last is not None and last[0]() is x and last[1] == x._version:
            return last[2]
        z = x @ factors.value(self, "v").to(x.dtype)
        self.computed += 1
        self._last = (weakref.ref(x), x._version, z)
        return z


class JointMemberLinear(nn.Module):
    def __init__(self, shared: SharedProjection, a, bias=None):
        super().__init__()
        self.shared = shared
        factors.hold(self, "a", a)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def forward(self, x):
        return nn.functional.linear(self.shared(x), factors.value(self, "a").to(x.dtype), self.bias)


def compress(weight, config: JointConfig, calib: Calibration | None = None) -> JointGroup:
    """Joint rank-k of a group: `weight` is one (m, n) matrix or a list sharing n."""
    members = list(weight) if isinstance(weight, list | tuple) else [weight]
    n = members[0].shape[1]
    if any(w.shape[1] != n for w in members):
        raise config_error(
            "joint",
            "targets",
            [tuple(w.shape) for w in members],
            "members of a joint group must read the same input size",
        )
    stack = torch.cat([w.detach().to(torch.float64) for w in members])
    config.check_shape(*stack.shape)
    chol = whitening_factor("joint", calib) if config.whiten else None
    _, _, vt = torch.linalg.svd(stack if chol is None else stack @ chol, full_matrices=False)
    q = vt[: config.rank].T  # (n, k), orthonormal
    # A_i = W_i L Q and V = L^{-T} Q, so that A_i V^T = W_i L Q Q^T L^{-1}
    basis = q if chol is None else chol @ q
    v = q if chol is None else torch.linalg.solve_triangular(chol.T, q, upper=True)
    dtype = members[0].dtype
    a = [(w.detach().to(torch.float64) @ basis).to(dtype) for w in members]
    fb, gs = config.factor_bits, config.factor_group_size
    return JointGroup(
        factors.quantize_factor(v.to(dtype), fb, gs),
        [factors.quantize_factor(x, fb, gs) for x in a],
    )
