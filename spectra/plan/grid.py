"""The settings each method offers one module, and the cheapest cost they can reach.

`grid` lists a method's settings for an (m, n) module of a role under the floors;
`candidates` adds each setting's damage, `cheapest` only its cost, so an impossible
budget is refused from the shapes alone, before a weight is read.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import numpy as np

from compressors.base import DENSE_BITS
from compressors.registry import make_config
from spectra.linalg import mpo as tt

METHODS = ("lowrank", "joint", "losparse", "mpo", "quant", "caldera", "mixed")
QUANT_BITS = (2, 3, 4, 5, 6, 7, 8)
QUANT_GROUP = 128
PRUNE_SPARSITY = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
LOSPARSE_RANK_FRACTIONS = (1 / 16, 1 / 8, 1 / 4, 1 / 2)
LOSPARSE_SPARSITY = (0.9, 0.95, 0.98, 0.99)
MPO_CORES = 3
MPO_BONDS = 12
CALDERA_BITS = (2, 3, 4)
CALDERA_RANKS = (16, 32, 64)
GRID = 48
JOINT_ROLES = (("q", "k", "v"), ("gate", "up"))


@dataclass
class Floors:
    """Lower limits on settings: rank fraction or bits per role, modules kept dense."""

    min_rank: dict[str, float] = field(default_factory=dict)  # role -> fraction of min(m, n)
    min_bits: dict[str, int] = field(default_factory=dict)  # role -> bits
    keep_dense: re.Pattern | None = None


def rank_grid(lo: int, hi: int, spectral: bool) -> list[int]:
    if hi < lo:
        return []
    if spectral or hi - lo + 1 <= GRID:
        return list(range(lo, hi + 1))
    return sorted({int(round(x)) for x in np.linspace(lo, hi, GRID)})


def floor_rank(role: str, floors: Floors, full: int) -> int:
    return max(1, math.ceil(floors.min_rank.get(role, 0.0) * full))


def grid(method: str, m: int, n: int, role: str, floors: Floors, spectral: bool = False):
    """The settings offered to one (m, n) module of `role` (dense aside), in order.

    Shared by the candidates (which add damage) and `cheapest` (which needs costs only).
    """
    dense_bits = DENSE_BITS * m * n
    if method in ("lowrank", "joint"):
        rmax = (m * n - 1) // (m + n)  # the largest rank that stores fewer numbers than W
        ranks = rank_grid(floor_rank(role, floors, min(m, n)), rmax, spectral)
        return [make_config("lowrank", rank=r) for r in ranks]
    if method == "quant":
        bits = [b for b in QUANT_BITS if b >= floors.min_bits.get(role, 0)]
        return [make_config("quant", bits=b, group_size=QUANT_GROUP) for b in bits]
    if method == "prune":
        if floors.min_bits.get(role, 0) > 0 or floors.min_rank.get(role, 0) > 0:
            return []  # a floor on this role: pruning cannot honour it
        return [make_config("prune", sparsity=s) for s in PRUNE_SPARSITY]
    if method == "losparse":
        rmax = (m * n - 1) // (m + n)
        lo = floor_rank(role, floors, min(m, n))
        ranks = sorted({max(lo, max(1, round(f * rmax))) for f in LOSPARSE_RANK_FRACTIONS})
        configs = [
            make_config("losparse", rank=r, sparsity=sp) for r in ranks for sp in LOSPARSE_SPARSITY
        ]
        return [c for c in configs if c.cost(m, n)[0] < m * n]
    if method == "mpo":
        mf, nf = tt.factorize(m, MPO_CORES), tt.factorize(n, MPO_CORES)
        top = max(tt.full_bond_dims(mf, nf))
        chis = sorted({int(round(x)) for x in np.geomspace(2, top, MPO_BONDS)})
        configs = [make_config("mpo", cores=MPO_CORES, bond_dim=chi) for chi in chis]
        return [c for c in configs if c.cost(m, n)[0] < m * n]
    if method == "caldera":
        lo = floor_rank(role, floors, min(m, n))
        configs = [
            make_config("caldera", rank=r, bits=b)
            for r in CALDERA_RANKS
            if lo <= r <= min(m, n)
            for b in CALDERA_BITS
            if b >= floors.min_bits.get(role, 0)
        ]
        return [c for c in configs if c.cost(m, n)[1] < dense_bits]
    if method == "mixed":
        return [
            c
            for part in ("lowrank", "quant", "prune")
            for c in grid(part, m, n, role, floors, spectral)
        ]
    raise ValueError(method)


def joint_grid(group_shapes: list[tuple[int, int]], roles: list[str], floors: Floors, spectral):
    """Shared ranks offered to a joint group (stacked rows, one input size)."""
    n = group_shapes[0][1]
    total_m = sum(m for m, _ in group_shapes)
    kmax = (total_m * n - 1) // (n + total_m)
    lo = max(floor_rank(r, floors, min(s)) for s, r in zip(group_shapes, roles, strict=True))
    return [make_config("joint", rank=k) for k in rank_grid(lo, kmax, spectral)]


def group_modules(modules: list, method: str) -> list[list]:
    """Allocation groups: joint siblings (q,k,v / gate,up under one parent) together for
    `joint`, else one module each. Needs only name, role and shape."""
    if method != "joint":
        return [[mod] for mod in modules]
    groups: list[list] = []
    by_parent: dict[tuple, list] = {}
    for mod in modules:
        parent = mod.name.rsplit(".", 1)[0]
        family = next((f for f in JOINT_ROLES if mod.role in f), None)
        if family is None:
            groups.append([mod])
        else:
            by_parent.setdefault((parent, family, mod.shape[1]), []).append(mod)
    return groups + list(by_parent.values())


def cheapest(modules: list, method: str, floors: Floors, key: str) -> int:
    """The least total cost (`params` or `bits`) `method` can reach from the shapes alone:
    every group at its cheapest setting, or dense where that is cheaper or required."""
    total = 0
    for group in group_modules(modules, method):
        m, n = sum(g.shape[0] for g in group), group[0].shape[1]
        costs = [(m * n, DENSE_BITS * m * n)]  # dense is always offered
        kept = floors.keep_dense
        if not (kept is not None and all(kept.fullmatch(g.name) for g in group)):
            if len(group) > 1:
                shapes, roles = [g.shape for g in group], [g.role for g in group]
                configs = joint_grid(shapes, roles, floors, False)
            else:
                configs = grid(method, m, n, group[0].role, floors)
            costs += [c.cost(m, n) for c in configs]
        total += min(p if key == "params" else b for p, b in costs)
    return total
