"""Budgeted allocation: one setting per module that minimizes total damage under a budget.

Each allocation unit (a module, or a joint group of modules that share one setting)
has candidate settings, each with an exact cost (parameters and bits, from the
method's own accounting) and a predicted damage (relative weight error squared,
Fisher-predicted loss increase, or a probe-scaled curve; see spectra.plan.candidates).
The total damage is the sum over units, the cost the sum of the chosen costs.

The solver is a Lagrangian sweep over the lower convex hull of every unit's
(cost, damage) curve: minimizing sum(damage + lambda * cost) for a decreasing lambda
visits exactly the hull segments in decreasing order of damage saved per unit of
cost, so the sweep takes segments from a heap in that order, starting from each
unit's cheapest candidate, while they fit. A segment that does not fit blocks its
unit (its later segments save less per cost), the others may still fill the rest.
A last pass swaps single units to any candidate, hull or not, that fits the
leftover and lowers the damage. The result never exceeds the budget; before the
last pass it is the Lagrangian optimum for the budget it spends, so its distance
from the true optimum is at most the damage of one hull step.

For pure low rank with the weight error every rank is a candidate and the curve of
rank k is the tail sum of sigma^2: convex, so every rank is on the hull and the sweep
is the greedy over singular values by sigma^2 per parameter, which is exact at the
budgets it stops at (a fractional knapsack that ends integral).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field

from spectra.errors import SpectraInputError


@dataclass(frozen=True)
class Candidate:
    """One setting for a unit: its config (None = stay dense), cost and damage."""

    config: object | None
    params: int
    bits: int
    damage: float

    def cost(self, key: str) -> int:
        return self.params if key == "params" else self.bits


@dataclass
class Unit:
    """Modules that take one setting together (a joint group, or one module)."""

    names: tuple[str, ...]
    candidates: list[Candidate]
    params_before: int = 0  # dense parameters of all its modules
    role: str = ""
    block: int | None = None
    meta: dict = field(default_factory=dict)


class BudgetError(SpectraInputError):
    """The budget cannot be met by the candidates (the message says what can)."""


def hull(cands: list[Candidate], key: str) -> list[Candidate]:
    """The lower convex hull of (cost, damage), from the cheapest point to the least
    damaging one, with damage strictly falling along it."""
    pts = sorted(cands, key=lambda c: (c.cost(key), c.damage))
    front: list[Candidate] = []
    for c in pts:  # drop dominated points: not cheaper and not less damaging
        if front and c.damage >= front[-1].damage:
            continue
        front.append(c)
    out: list[Candidate] = []
    for c in front:
        while len(out) >= 2:
            a, b = out[-2], out[-1]
            # b is above the chord a-c: remove it
            cross = (b.cost(key) - a.cost(key)) * (c.damage - a.damage) - (
                c.cost(key) - a.cost(key)
            ) * (b.damage - a.damage)
            if cross <= 0:
                out.pop()
            else:
                break
        out.append(c)
    return out


def reachable(units: list[Unit], key: str) -> tuple[int, int]:
    """(smallest, largest) total cost the candidates can reach."""
    lo = sum(min(c.cost(key) for c in u.candidates) for u in units)
    hi = sum(max(c.cost(key) for c in u.candidates) for u in units)
    return lo, hi


def allocate(units: list[Unit], budget: int, key: str = "params") -> list[Candidate]:
    """One candidate per unit with total cost <= budget and small total damage."""
    if any(not u.candidates for u in units):
        empty = next(u for u in units if not u.candidates)
        raise BudgetError(f"{empty.names[0]}: no candidate setting")
    lo, _ = reachable(units, key)
    if lo > budget:
        raise BudgetError(f"budget {budget} {key} is below the smallest reachable {lo}")
    hulls = [hull(u.candidates, key) for u in units]
    pos = [0] * len(units)
    spent = sum(h[0].cost(key) for h in hulls)
    heap: list[tuple[float, int]] = []

    def push(i: int) -> None:
        h, p = hulls[i], pos[i]
        if p + 1 < len(h):
            dc = h[p + 1].cost(key) - h[p].cost(key)
            dd = h[p].damage - h[p + 1].damage
            heapq.heappush(heap, (-dd / max(dc, 1e-300), i))

    for i in range(len(units)):
        push(i)
    while heap:
        _, i = heapq.heappop(heap)
        h, p = hulls[i], pos[i]
        step = h[p + 1].cost(key) - h[p].cost(key)
        if spent + step <= budget:
            spent += step
            pos[i] = p + 1
            push(i)
    chosen = [h[p] for h, p in zip(hulls, pos, strict=True)]
    return _polish(units, chosen, budget - spent, key)


def allocate_by_role(units: list[Unit], budget: int, key: str = "params") -> list[Candidate]:
    """`allocate` within each role, every role getting the share of `budget` its dense
    cost has (what uniform compression gives it); the leftover is then spent by
    single-unit swaps across roles. For damages that compare well within a role but
    not across roles (a relative calibration-weighted error: q and k outputs go
    through a softmax, down and o add to the residual stream)."""
    from compressors.base import DENSE_BITS

    def dense(u: Unit) -> int:
        return u.params_before * (DENSE_BITS if key == "bits" else 1)

    total = sum(dense(u) for u in units)
    by_role: dict[str, list[int]] = {}
    for i, u in enumerate(units):
        by_role.setdefault(u.role, []).append(i)
    shares = {r: budget * sum(dense(units[i]) for i in idx) // total for r, idx in by_role.items()}
    if any(reachable([units[i] for i in idx], key)[0] > shares[r] for r, idx in by_role.items()):
        return allocate(units, budget, key)  # a role cannot meet its share: one allocation
    chosen: list[Candidate | None] = [None] * len(units)
    for r, idx in by_role.items():
        for i, c in zip(idx, allocate([units[i] for i in idx], shares[r], key), strict=True):
            chosen[i] = c
    left = budget - sum(c.cost(key) for c in chosen)
    return _polish(units, chosen, left, key)


def _polish(units, chosen, left: int, key: str, rounds: int = 3) -> list[Candidate]:
    """Single-unit swaps to any candidate that fits the leftover and lowers damage."""
    for _ in range(rounds):
        best = None
        for i, u in enumerate(units):
            cur = chosen[i]
            for c in u.candidates:
                extra = c.cost(key) - cur.cost(key)
                gain = cur.damage - c.damage
                if extra <= left and gain > 0 and (best is None or gain > best[0]):
                    best = (gain, i, c, extra)
        if best is None:
            break
        _, i, c, extra = best
        chosen[i] = c
        left -= extra
    return chosen


def totals(chosen: list[Candidate]) -> dict:
    return dict(
        params=sum(c.params for c in chosen),
        bits=sum(c.bits for c in chosen),
        damage=sum(c.damage for c in chosen),
    )
