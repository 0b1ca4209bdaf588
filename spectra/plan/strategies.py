"""Allocation strategies of `plan auto --allocate`: who gives up how much, by a rule.

`loss` (the default) is spectra.plan.allocate's damage-minimizing allocation. The
others give every allocation unit a target *fraction of its dense cost* from a
per-block score, then pick each unit's candidate from the same candidates `loss`
chooses among (so floors, `--keep-dense`, joint groups and every method's calibrated
forms are the same), and meet the budget the same way (spent <= budget, close to it):

- `uniform`: every unit the same fraction.
- `alpha` (AlphaPruning, Lu et al., NeurIPS 2024): each block's score is the mean
  power-law alpha of its matrices' eigenvalue spectra (spectra.analysis); higher
  alpha (less heavy-tailed, less trained) is compressed more.
- `farms` (Hu et al., ICML 2025): the same on alpha measured over fixed-aspect-ratio
  submatrices (spectra.linalg.farms).
- `owl` (Yin et al., ICML 2024): each block's outlier ratio, the share of its Wanda
  scores |W_ij| * ||X_j|| above OUTLIER_M times their mean (all the block's matrices
  pooled; ||X_j||^2 is the calibration Gram's diagonal); a higher ratio is compressed
  less.

The mapping. Scores x_b become z_b = 2 (x_b - min) / (max - min) - 1 in [-1, 1] (all 0
when every block scores the same), oriented so that z = +1 is compressed most. With a
level t that is found by bisection, a unit's target fraction f (cost / dense cost) is:

- `--target-params`: the mapped quantity is the removed share 1 - f (the sparsity
  for prune, 1 - the rank's keep ratio for lowrank and losparse):
  uniform 1 - f = 1 - t; alpha and farms 1 - f = (1 - t)(1 + e z); owl f = t - band z.
- `--target-bits`: the mapped quantity is the kept share f (bits / 16: the bits for
  quant): uniform f = t; alpha and farms f = t (1 - e z); owl f = t (1 - band z).

So alpha maps the target's compression linearly onto [1 - e, 1 + e] x target, and owl
onto target +- band (additive in the removed share, as OWL's sparsity band; relative in
the bits). The common factor that the papers rescale so that the parameter-weighted
mean meets the target is the level t: bisection finds the largest t whose picks fit
the budget, which is that rescaling done on the real, discrete costs.

Picking. Each unit takes the candidate whose cost is nearest f x its dense cost; among
candidates within PICK_TOL of its dense cost from the nearest (Wanda and SparseGPT at
one sparsity, for instance) the least damage wins (the damage of `--sensitivity`).
After the bisection, the leftover budget is spent by single steps: the unit furthest
below its target (relative to its dense cost) moves to its next costlier candidate
that is less damaging, while one fits.

Fallbacks, recorded in the plan's `allocation` key: a matrix whose alpha is undefined
(too few eigenvalues above the threshold for a fit) is left out of its block's mean
("block mean"); a block with no defined score (every alpha undefined, or no
calibration input for owl, e.g. an LM head outside the blocks) gets the mean of the
other blocks' scores ("global mean").
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from compressors.base import DENSE_BITS
from spectra.errors import SpectraInputError
from spectra.plan.allocate import Candidate, Unit

STRATEGIES = ("loss", "uniform", "alpha", "farms", "owl")
DEFAULT_E = 0.2  # AlphaPruning's e with Wanda / SparseGPT (and every calibrated method)
DEFAULT_E_MAGNITUDE = 0.3  # ... with magnitude pruning
DEFAULT_BAND = 0.08  # OWL's lambda
OUTLIER_M = 5.0  # OWL's M: a score above M x the block mean is an outlier
PICK_TOL = 0.005  # candidates this close in cost (fraction of dense) count as one level
METRIC = {"alpha": "alpha", "farms": "farms_alpha", "owl": "outlier_ratio"}


@dataclass(frozen=True)
class Strategy:
    """`--allocate` and its knobs.

    Attributes:
        name: one of STRATEGIES.
        e: alpha and farms: the band [1 - e, 1 + e] around the target (None:
            DEFAULT_E_MAGNITUDE for data-free pruning, else DEFAULT_E).
        band: owl: the band around the target.
        calib: owl: the calibration (spectra.plan.sensitivity.SensitivitySettings of
            kind calib) whose Grams give ||X_j||; None: the one `--sensitivity calib`
            reads, else spectra.plan.defaults.FIRST_CALIB_TOKENS tokens.
    """

    name: str = "loss"
    e: float | None = None
    band: float = DEFAULT_BAND
    calib: object | None = None

    def __post_init__(self):
        if self.name not in STRATEGIES:
            raise SpectraInputError(f"--allocate {self.name}: use one of {', '.join(STRATEGIES)}")
        if self.e is not None and not 0 < self.e < 1:
            raise SpectraInputError(f"--alpha-e {self.e}: must be in (0, 1)")
        if not 0 < self.band < 1:
            raise SpectraInputError(f"--owl-band {self.band}: must be in (0, 1)")

    def spread(self, data_free_prune: bool) -> float:
        """The band's half-width: e (alpha, farms), band (owl), 0 (uniform)."""
        if self.name in ("alpha", "farms"):
            if self.e is not None:
                return self.e
            return DEFAULT_E_MAGNITUDE if data_free_prune else DEFAULT_E
        return self.band if self.name == "owl" else 0.0


# per-block scores


def block_scores(units: list[Unit], values: dict[str, float]) -> tuple[dict, dict]:
    """({unit index: score}, {module: fallback}) from per-module `values` (NaN or
    missing: undefined): a unit's score is its block's mean over the block's defined
    values (a unit outside the blocks is its own block); see the module docstring."""
    groups: dict[object, list[int]] = {}
    for i, u in enumerate(units):
        groups.setdefault(u.block if u.block is not None else ("alone", i), []).append(i)
    fallback: dict[str, str] = {}
    means: dict[object, float] = {}
    for g, idx in groups.items():
        names = [n for i in idx for n in units[i].names]
        ok = [values[n] for n in names if _defined(values.get(n))]
        if ok:
            means[g] = sum(ok) / len(ok)
            fallback.update({n: "block mean" for n in names if not _defined(values.get(n))})
    known = list(means.values())
    overall = sum(known) / len(known) if known else 0.0
    for g, idx in groups.items():
        if g not in means:
            means[g] = overall
            fallback.update({n: "global mean" for i in idx for n in units[i].names})
    return {i: means[g] for g, idx in groups.items() for i in idx}, fallback


def _defined(v) -> bool:
    return v is not None and math.isfinite(v)


def outlier_ratio(weights: list, gram_diags: list, m: float = OUTLIER_M) -> float:
    """OWL's outlier ratio of a block: the share of Wanda scores |W_ij| * ||X_j|| (all
    `weights` pooled, (out, in) each, with ||X_j||^2 = `gram_diags`' H_jj) above `m`
    times their mean."""
    import torch

    def f64(a):
        return a.double() if isinstance(a, torch.Tensor) else torch.tensor(a, dtype=torch.float64)

    scores = [
        (f64(w).abs() * f64(d).clamp(min=0).sqrt()).reshape(-1)
        for w, d in zip(weights, gram_diags, strict=True)
    ]
    pooled = torch.cat(scores)
    return float((pooled > m * pooled.mean()).double().mean())


def owl_values(units: list[Unit], weights: dict, hessians: dict) -> dict[str, float]:
    """Every block's outlier ratio, given to each of its modules that has a Gram (a
    module without one is undefined: see `block_scores`)."""
    by_block: dict[object, list[str]] = {}
    for u in units:
        for n in u.names:
            if n in hessians:
                by_block.setdefault(u.block if u.block is not None else n, []).append(n)
    out = {}
    for names in by_block.values():
        ratio = outlier_ratio([weights[n] for n in names], [hessians[n].diagonal() for n in names])
        out.update({n: ratio for n in names})
    return out


def directions(scores: dict[int, float], strategy: str) -> dict[int, float]:
    """z in [-1, 1] per unit, +1 = compressed most (highest alpha, lowest outlier ratio)."""
    if strategy == "uniform" or not scores:
        return {i: 0.0 for i in scores}
    lo, hi = min(scores.values()), max(scores.values())
    if hi - lo <= 1e-12 * max(abs(hi), 1.0):
        return {i: 0.0 for i in scores}
    sign = -1.0 if strategy == "owl" else 1.0
    return {i: sign * (2 * (x - lo) / (hi - lo) - 1) for i, x in scores.items()}


def fraction(t: float, z: float, spread: float, strategy: str, key: str) -> float:
    """A unit's target cost fraction at level t (the table of the module docstring)."""
    if key == "params":
        if strategy == "owl":
            return t - spread * z
        return 1 - (1 - t) * (1 + spread * z)
    return t * (1 - spread * z)


# picking candidates and meeting the budget


def dense_cost(u: Unit, key: str) -> int:
    return u.params_before * (DENSE_BITS if key == "bits" else 1)


def pick(u: Unit, f: float, key: str) -> Candidate:
    """The candidate of `u` nearest f x its dense cost (least damage among near ties)."""
    dense = dense_cost(u, key)
    goal = min(max(f, 0.0), 1.0) * dense
    near = min(abs(c.cost(key) - goal) for c in u.candidates)
    tied = [c for c in u.candidates if abs(c.cost(key) - goal) <= near + PICK_TOL * dense]
    return min(tied, key=lambda c: (c.damage, abs(c.cost(key) - goal), c.cost(key)))


def allocate_by_fractions(units, z: dict, spread: float, strategy: str, budget: int, key: str):
    """(one candidate per unit, level t): the largest level whose picks fit `budget`,
    then the leftover spent by single steps (see the module docstring)."""

    def picks(t):
        return [pick(u, fraction(t, z[i], spread, strategy, key), key) for i, u in enumerate(units)]

    def spent(chosen):
        return sum(c.cost(key) for c in chosen)

    top = 1.0 / (1.0 - spread) + 1.0  # every fraction >= 1: all dense
    lo, hi = -top, top  # at lo every fraction is <= 0: all at their cheapest
    best = picks(lo)
    if spent(best) > budget:
        from spectra.plan.allocate import BudgetError

        raise BudgetError(f"budget {budget} {key} is below the smallest reachable {spent(best)}")
    top_picks = picks(hi)
    if spent(top_picks) <= budget:
        return top_picks, hi
    for _ in range(60):
        mid = (lo + hi) / 2
        got = picks(mid)
        if spent(got) <= budget:
            lo, best = mid, got
        else:
            hi = mid
    return _fill(units, best, z, spread, strategy, lo, budget - spent(best), key), lo


def _fill(units, chosen, z, spread, strategy, t, left: int, key: str) -> list[Candidate]:
    """Single steps up, the unit furthest below its target first, while one fits."""
    chosen = list(chosen)
    while True:
        best = None
        for i, u in enumerate(units):
            cur = chosen[i]
            ups = [
                c
                for c in u.candidates
                if cur.cost(key) < c.cost(key) <= cur.cost(key) + left and c.damage < cur.damage
            ]
            if not ups:
                continue
            dense = dense_cost(u, key)
            goal = min(max(fraction(t, z[i], spread, strategy, key), 0.0), 1.0) * dense
            gap = (goal - cur.cost(key)) / max(dense, 1)
            if best is None or gap > best[0]:
                step = min(ups, key=lambda c: (c.cost(key), c.damage))
                best = (gap, i, step)
        if best is None:
            return chosen
        _, i, step = best
        left -= step.cost(key) - chosen[i].cost(key)
        chosen[i] = step


def allocate_strategy(
    strategy: Strategy,
    units: list[Unit],
    budget: int,
    key: str,
    values: dict[str, float] | None = None,
    data_free_prune: bool = False,
) -> tuple[list[Candidate], dict]:
    """(one candidate per unit, the plan's `allocation` record) for a rule strategy.

    `values`: per-module score (alpha, FARMS alpha or outlier ratio; unused by
    uniform); `data_free_prune`: the candidates are magnitude pruning (e's default).
    """
    if strategy.name == "loss":
        raise ValueError("loss is spectra.plan.allocate's")
    spread = strategy.spread(data_free_prune)
    scores, fallback = ({i: 0.0 for i in range(len(units))}, {})
    if strategy.name != "uniform":
        scores, fallback = block_scores(units, values or {})
    z = directions(scores, strategy.name)
    chosen, level = allocate_by_fractions(units, z, spread, strategy.name, budget, key)
    record: dict = {"strategy": strategy.name}
    if strategy.name in ("alpha", "farms"):
        record["e"] = spread
    elif strategy.name == "owl":
        record.update(band=spread, outlier_m=OUTLIER_M)
    record["level"] = round(level, 6)
    if strategy.name != "uniform":
        record["metric"] = METRIC[strategy.name]
        blocks = {}
        for i, u in enumerate(units):
            if u.block is not None:
                blocks.setdefault(int(u.block), round(float(scores[i]), 6))
        record["blocks"] = dict(sorted(blocks.items()))
        if fallback:
            record["fallback"] = dict(sorted(fallback.items()))
    return chosen, record
