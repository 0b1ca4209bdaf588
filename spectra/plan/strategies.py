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
from collections.abc import Callable
from dataclasses import dataclass, field

from compressors.base import DENSE_BITS
from spectra.errors import SpectraInputError
from spectra.plan.allocate import Candidate, Unit
from spectra.plan.rule_scores import OUTLIER_M, alphas, outliers

DEFAULT_E = 0.2  # AlphaPruning's e with Wanda / SparseGPT (and every calibrated method)
DEFAULT_BAND = 0.08  # OWL's lambda
PICK_TOL = 0.005  # candidates this close in cost (fraction of dense) count as one level


@dataclass(frozen=True)
class Rule:
    """One `--allocate` rule, registered once (`register_rule`): the CLI's choices, the
    app's options and plan auto read RULES.

    Attributes:
        name: the flag's value.
        label: the app's name for it.
        metric: the per-block score it maps onto the band, as the plan records it (None:
            no score).
        sign: +1: a higher score is compressed more; -1: less.
        knob: the Strategy field that sets its band: "e", "band" or None (no band).
        additive: under --target-params the band is added to the kept share (OWL's
            sparsity band), else it scales the removed share (AlphaPruning).
        by_loss: it is the damage-minimizing allocation (spectra.plan.allocate).
        needs_calibration: its scores read the model's calibration.
        scores: scores(scoring) -> ({module: score}, the calibration windows read or
            None), `scoring` a `Scoring`; None: no scores.
        record: what else the plan's `allocation` key records.
    """

    name: str
    label: str
    metric: str | None = None
    sign: float = 1.0
    knob: str | None = None
    additive: bool = False
    by_loss: bool = False
    needs_calibration: bool = False
    scores: Callable | None = None
    record: dict = field(default_factory=dict)


RULES: dict[str, Rule] = {}


def register_rule(rule: Rule) -> Rule:
    """Add an allocation rule (a name already taken is an error)."""
    if RULES.get(rule.name, rule) is not rule:
        raise ValueError(f"allocation rule {rule.name!r} is already registered")
    RULES[rule.name] = rule
    return rule


@dataclass(frozen=True)
class Strategy:
    """`--allocate` and its knobs.

    Attributes:
        name: a name of RULES.
        e: alpha and farms: the band [1 - e, 1 + e] around the target (None: the
            method's `data_free_e` when its candidates are data-free, else DEFAULT_E).
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
        if self.name not in RULES:
            raise SpectraInputError(f"--allocate {self.name}: use one of {', '.join(RULES)}")
        if self.e is not None and not 0 < self.e < 1:
            raise SpectraInputError(f"--alpha-e {self.e}: must be in (0, 1)")
        if not 0 < self.band < 1:
            raise SpectraInputError(f"--owl-band {self.band}: must be in (0, 1)")

    @property
    def rule(self) -> Rule:
        return RULES[self.name]

    def spread(self, data_free_e: float | None = None) -> float:
        """The band's half-width: e (alpha, farms; `data_free_e`: the method's own
        default for data-free candidates), band (owl), 0 (uniform)."""
        if self.rule.knob == "e":
            return self.e if self.e is not None else (data_free_e or DEFAULT_E)
        return self.band if self.rule.knob == "band" else 0.0


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


def directions(scores: dict[int, float], strategy: str) -> dict[int, float]:
    """z in [-1, 1] per unit, +1 = compressed most (highest alpha, lowest outlier ratio)."""
    rule = RULES[strategy]
    if rule.metric is None or not scores:
        return {i: 0.0 for i in scores}
    lo, hi = min(scores.values()), max(scores.values())
    if hi - lo <= 1e-12 * max(abs(hi), 1.0):
        return {i: 0.0 for i in scores}
    sign = rule.sign
    return {i: sign * (2 * (x - lo) / (hi - lo) - 1) for i, x in scores.items()}


def fraction(t: float, z: float, spread: float, strategy: str, key: str) -> float:
    """A unit's target cost fraction at level t (the table of the module docstring)."""
    if key == "params":
        if RULES[strategy].additive:
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
    data_free_e: float | None = None,
) -> tuple[list[Candidate], dict]:
    """(one candidate per unit, the plan's `allocation` record) for a rule strategy.

    `values`: per-module score (alpha, FARMS alpha or outlier ratio; unused by
    uniform); `data_free_e`: the method's e when its candidates are data-free.
    """
    rule = strategy.rule
    if rule.by_loss:
        raise ValueError(f"{rule.name} is spectra.plan.allocate's")
    spread = strategy.spread(data_free_e)
    scores, fallback = ({i: 0.0 for i in range(len(units))}, {})
    if rule.metric is not None:
        scores, fallback = block_scores(units, values or {})
    z = directions(scores, strategy.name)
    chosen, level = allocate_by_fractions(units, z, spread, strategy.name, budget, key)
    record: dict = {"strategy": strategy.name}
    if rule.knob is not None:
        record[rule.knob] = spread
    record.update(rule.record)
    record["level"] = round(level, 6)
    if rule.metric is not None:
        record["metric"] = rule.metric
        blocks = {}
        for i, u in enumerate(units):
            if u.block is not None:
                blocks.setdefault(int(u.block), round(float(scores[i]), 6))
        record["blocks"] = dict(sorted(blocks.items()))
        if fallback:
            record["fallback"] = dict(sorted(fallback.items()))
    return chosen, record


# the registered rules


for _rule in (
    Rule("loss", "least predicted damage", by_loss=True),
    Rule("uniform", "uniform"),
    Rule("alpha", "alpha (AlphaPruning)", metric="alpha", knob="e", scores=alphas),
    Rule(
        "farms",
        "FARMS alpha",
        metric="farms_alpha",
        knob="e",
        scores=lambda scoring: alphas(scoring, "farms_alpha"),
    ),
    Rule(
        "owl",
        "outliers (OWL)",
        metric="outlier_ratio",
        sign=-1.0,
        knob="band",
        additive=True,
        needs_calibration=True,
        scores=outliers,
        record={"outlier_m": OUTLIER_M},
    ),
):
    register_rule(_rule)
