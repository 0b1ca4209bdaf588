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
    DENSE_BITS,
    Calibration,
    Factorization,
    check_rank,
    config_error,
    require_int,
    whitening_factor,
)
from compressors.lowrank import FACTOR_KNOBS, LowRankConfig, half_rank, rank_grid
from compressors.lowrank import candidates as lowrank_candidates
from compressors.lowrank import grid as lowrank_grid
from compressors.method import Floor, Knob, Method, break_even_rank

FAMILIES = (("q", "k", "v"), ("gate", "up"))  # sibling roles that read one input


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
class JointGroup(factors.QuantizedFactors, Factorization):
    v: torch.Tensor | factors.QuantizedFactor  # (n, k), shared
    a: list  # (m_i, k) per member, tensors or QuantizedFactors

    @property
    def shape(self):
        return (sum(x.shape[0] for x in self.a), self.v.shape[0])

    @property
    def rank(self) -> int:
        return self.v.shape[1]

    @property
    def members(self) -> int:
        return len(self.a)

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


# planning: a group's shared ranks and their damage; a lone member plans as lowrank


def group_grid(shapes: list[tuple[int, int]], floors: list[Floor], spectral: bool):
    """Shared ranks offered to a group (stacked rows, one input size)."""
    n, total_m = shapes[0][1], sum(m for m, _ in shapes)
    lo = max(f.min_rank(min(s)) for s, f in zip(shapes, floors, strict=True))
    return [JointConfig(rank=k) for k in rank_grid(lo, break_even_rank(total_m, n), spectral)]


def group_candidates(group: list, dmg, floors: list[Floor]) -> list[tuple]:
    """(config, damage) per shared rank, the damage summed over the members."""
    closed = dmg.spectral or dmg.calib(group[0]) is not None
    ks = [c.rank for c in group_grid([g.shape for g in group], floors, closed)]
    if not ks:
        return []
    calib = dmg.calib(group[0])
    if calib is not None:
        return _whitened_candidates(group, dmg, ks, calib)
    stacked = torch.cat([g.weight for g in group]).double()
    _, _, vh = torch.linalg.svd(stacked, full_matrices=False)
    v = vh.T  # (n, min)
    projections = [g.weight.double() @ v for g in group]  # W_i V
    out = []
    if dmg.spectral:
        cums = [torch.cumsum(p.pow(2).sum(0), 0) for p in projections]
        norms = [float(g.weight.double().pow(2).sum()) for g in group]
    for k in ks:
        if dmg.spectral:
            d = sum(
                dmg.relative(g.name, nrm - float(c[k - 1]), nrm)
                for g, c, nrm in zip(group, cums, norms, strict=True)
            )
        else:
            d = sum(
                dmg(g, (g.weight.double() - p[:, :k] @ v[:, :k].T).float())
                for g, p in zip(group, projections, strict=True)
            )
        out.append((JointConfig(rank=k), d))
    return out


def _whitened_candidates(group: list, dmg, ks: list[int], calib) -> list[tuple]:
    """Whitened joint: member i's error at rank k is ||W_i L||^2 - ||W_i L Q_k||^2."""
    chol = whitening_factor("joint", calib)
    white = [g.weight.double() @ chol for g in group]
    _, _, vh = torch.linalg.svd(torch.cat(white), full_matrices=False)
    # member i's whitened error at rank k: the columns k.. of W_i L Q (plus what lies
    # outside Q's span, which is nothing when the stack has full column rank)
    terms = [dmg.whitened_terms(g, x @ vh.T) for g, x in zip(group, white, strict=True)]
    norms = [float(dmg.whitened_terms(g, x).sum()) for g, x in zip(group, white, strict=True)]
    cums = [torch.cumsum(t, 0) for t in terms]
    out = []
    for k in ks:
        d = sum(max(nrm - float(c[k - 1]), 0.0) for c, nrm in zip(cums, norms, strict=True))
        out.append((JointConfig(rank=k, whiten=True), d))
    return out


def member_costs(config: JointConfig, shapes: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """(params, bits) per member: the shared V is counted with the first member."""
    n = shapes[0][1]
    params = [config.rank * (m + (n if i == 0 else 0)) for i, (m, _) in enumerate(shapes)]
    return [(p, DENSE_BITS * p) for p in params]


def alone(config: JointConfig, shape: tuple[int, int]) -> LowRankConfig:
    """A member alone is its own rank-k SVD (what a one-module preview shows)."""
    return LowRankConfig(rank=min(config.rank, *shape), whiten=config.whiten)


METHOD = Method(
    name="joint",
    config_cls=JointConfig,
    compress=compress,
    summary="for siblings reading one input (q,k,v / gate,up): one shared V (n x r) and "
    "each W_i V (m_i x r)",
    paper="Data-free Joint Rank-k Approximation (Peng et al. 2024)",
    data="whiten",
    knobs=(
        Knob("rank", "shared rank k, 1..min(sum m_i, n)", 64, "int", 1),
        Knob("whiten", "activation-aware shared basis (needs calibration)", False, "bool"),
        *FACTOR_KNOBS,
    ),
    flags=("whiten",),
    columns=("rank",),
    defaults=lambda m, n: {"rank": half_rank(m, n)},
    grid=lowrank_grid,
    candidates=lowrank_candidates,
    spectral=True,
    families=FAMILIES,
    group_grid=group_grid,
    group_candidates=group_candidates,
    member_costs=member_costs,
    alone=alone,
    factorizations=(JointGroup,),
    exports={"compressed-tensors": "joint rank-k factors: no compressed-tensors format"},
)
