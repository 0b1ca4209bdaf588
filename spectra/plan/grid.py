"""The settings each method offers one module, and the cheapest cost they can reach.

Each method's own `grid` (compressors.registry) lists its settings for an (m, n)
module under its role's floors; `candidates` adds each setting's damage, `cheapest`
only its cost, so an impossible budget is refused from the shapes alone, before a
weight is read. `mixed` offers the settings of every method registered with
`mixed=True` to every module.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from compressors.base import DENSE_BITS
from compressors.method import Floor
from compressors.registry import METHODS, groups, mixed

MIXED = "mixed"  # the `plan auto --method` that offers every `mixed` method's settings


def auto_methods() -> tuple[str, ...]:
    """What `plan auto --method` takes: every registered method with a grid, and mixed."""
    return (*(name for name, m in METHODS.items() if m.grid is not None), MIXED)


@dataclass
class Floors:
    """Lower limits on settings: rank fraction or bits per role, modules kept dense."""

    min_rank: dict[str, float] = field(default_factory=dict)  # role -> fraction of min(m, n)
    min_bits: dict[str, int] = field(default_factory=dict)  # role -> bits
    keep_dense: re.Pattern | None = None
    preset: str | None = None  # `plan auto --preset`: e.g. quant's "llama.cpp"

    def of(self, role: str) -> Floor:
        """What the floors ask of one module of `role`."""
        return Floor(self.min_rank.get(role, 0.0), self.min_bits.get(role, 0), self.preset)


def parts(method: str) -> tuple[str, ...]:
    """The registered methods whose settings `method` offers."""
    return mixed() if method == MIXED else (method,)


def grid(method: str, m: int, n: int, role: str, floors: Floors, spectral: bool = False):
    """The settings offered to one (m, n) module of `role` (dense aside), in order.

    Shared by the candidates (which add damage) and `cheapest` (which needs costs only).
    """
    if method not in auto_methods():
        raise ValueError(method)
    floor = floors.of(role)
    return [c for part in parts(method) for c in METHODS[part].grid(m, n, floor, spectral)]


def joint_grid(method: str, group: list, floors: Floors, spectral: bool):
    """Shared settings offered to a group of siblings (stacked rows, one input size)."""
    shapes, roles = [g.shape for g in group], [g.role for g in group]
    return METHODS[method].group_grid(shapes, [floors.of(r) for r in roles], spectral)


def group_modules(modules: list, method: str) -> list[list]:
    """Allocation units: compressors.registry.groups under `method` (joint: q,k,v / gate,up
    under one parent together), modules alone first. Needs only name, role and shape."""
    units = groups(modules, lambda mod: method)
    family = METHODS[method].family if method in METHODS else lambda role: None
    return sorted(units, key=lambda u: family(u[0].role) is not None)  # stable


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
                configs = joint_grid(method, group, floors, False)
            else:
                configs = grid(method, m, n, group[0].role, floors)
            costs += [c.cost(m, n) for c in configs]
        total += min(p if key == "params" else b for p, b in costs)
    return total
