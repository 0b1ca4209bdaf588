"""`spectra plan auto`: candidates, damage and allocation turned into an explicit plan."""

from __future__ import annotations

import dataclasses
import math
import re
import time
from dataclasses import dataclass

import torch

from compressors.quant import PRESETS
from compressors.registry import METHODS
from spectra.analysis import spectra_by_name
from spectra.errors import SpectraInputError
from spectra.io.model import Model
from spectra.io.roles import ROLES
from spectra.plan import candidates as cands
from spectra.plan import sensitivity as sens
from spectra.plan.allocate import BudgetError, Candidate, Unit, allocate, allocate_by_role
from spectra.plan.format import NOT_TARGETABLE, Plan
from spectra.plan.grid import Floors, auto_methods, cheapest, parts
from spectra.plan.rule_scores import Scoring
from spectra.plan.strategies import Strategy, allocate_strategy


@dataclass
class AutoResult:
    method: str
    sensitivity: str
    plan: Plan
    units: list[Unit]
    chosen: list[Candidate]
    key: str  # params | bits
    budget: int
    total_params: int  # dense parameters of the linear modules
    seconds: dict
    allocate: str = "loss"  # the --allocate strategy (spectra.plan.strategies)

    @property
    def spent(self) -> int:
        return sum(c.cost(self.key) for c in self.chosen)

    @property
    def damage(self) -> float:
        return sum(c.damage for c in self.chosen)

    @property
    def params_ratio(self) -> float:
        return sum(c.params for c in self.chosen) / self.total_params

    @property
    def bits_per_param(self) -> float:
        return sum(c.bits for c in self.chosen) / self.total_params

    def summary(self) -> dict:
        return dict(
            method=self.method,
            sensitivity=self.sensitivity,
            allocate=self.allocate,
            key=self.key,
            budget=self.budget,
            spent=self.spent,
            params_ratio=self.params_ratio,
            bits_per_param=self.bits_per_param,
            predicted_damage=self.damage,
            modules=sum(len(u.names) for u in self.units),
            compressed=sum(
                len(u.names) for u, c in zip(self.units, self.chosen, strict=True) if c.config
            ),
            seconds=self.seconds,
        )


def parse_floors(
    min_rank: list[str] | None,
    min_bits: list[str] | None,
    keep_dense: str | None,
    preset: str | None = None,
):
    """Floors from `ROLE=VALUE` strings, a full-match regex and a preset name (exit 2 on
    nonsense)."""

    def pairs(items, flag, cast, ok):
        out = {}
        for item in items or []:
            role, sep, value = item.partition("=")
            if not sep or role not in ROLES:
                raise SpectraInputError(
                    f"{flag} {item!r}: use ROLE=VALUE with ROLE one of {', '.join(ROLES)}"
                )
            try:
                v = cast(value)
            except ValueError:
                v = None
            if v is None or not ok(v):
                raise SpectraInputError(f"{flag} {item!r}: bad value {value!r}")
            out[role] = v
        return out

    pattern = None
    if keep_dense is not None:
        try:
            pattern = re.compile(keep_dense)
        except re.error as e:
            raise SpectraInputError(f"--keep-dense {keep_dense!r}: does not compile ({e})") from e
    if preset is not None and preset not in PRESETS:
        raise SpectraInputError(f"--preset {preset!r}: use one of {', '.join(PRESETS)}")
    return Floors(
        pairs(min_rank, "--min-rank", float, lambda v: 0 < v <= 1),
        pairs(min_bits, "--min-bits", int, lambda v: 2 <= v <= 16),
        pattern,
        preset,
    )


def load_modules(mats) -> list[cands.Module]:
    """The linear modules of `mats` (a model's matrices), each read from the checkpoint
    when its candidates are built, then released."""
    out = []
    for m in mats:
        if m.role in NOT_TARGETABLE:
            continue
        read = lambda m=m: torch.from_numpy(m.read())  # noqa: E731
        out.append(cands.Module(m.name, m.role, m.block, read, tuple(m.shape)))
    return out


def _check_reachable(lo: int, budget: int, total: int, key: str, target: float, method: str):
    if lo <= budget:
        return
    if key == "params":
        reach = f"{lo / total:.4g} of the linear parameters ({lo:,} of {total:,})"
    else:
        reach = f"{lo / total:.4g} bits per linear parameter"
    raise BudgetError(
        f"--target-{key} {target}: {method} cannot go below {reach} "
        "with these floors and dense modules"
    )


def auto_plan(
    model: Model,
    method: str,
    target_params: float | None = None,
    target_bits: float | None = None,
    sensitivity: str = "none",
    floors: Floors | None = None,
    sens_settings=None,
    progress=None,
    use_cache: bool = True,
    importance: bool = True,
    strategy: Strategy | None = None,
    network=None,
) -> AutoResult:
    """An explicit per-module plan for `method` that meets the budget with least damage,
    or, with a rule `strategy` (spectra.plan.strategies), by that rule.

    `importance` (calib only): weight each module's calibration-weighted error by its
    outputs' loss gradients, so damages are loss estimates allocated across all
    modules (else relative errors, allocated within each role; a rule strategy uses
    damage only to choose among candidates of one cost, so it never needs them).
    The sensitivity runs `network` when given, else the model's shared one (as it was
    opened: dtype, offload).
    """

    t0 = time.perf_counter()
    if method not in auto_methods():
        raise SpectraInputError(f"--method {method}: use one of {', '.join(auto_methods())}")
    if sensitivity != "none" and sensitivity not in sens.KINDS:
        known = ", ".join(("none", *sens.KINDS))
        raise SpectraInputError(f"--sensitivity {sensitivity}: use {known}")
    if (target_params is None) == (target_bits is None):
        raise SpectraInputError("give exactly one of --target-params and --target-bits")
    if target_params is not None and not 0 < target_params <= 1:
        raise SpectraInputError(f"--target-params {target_params}: must be in (0, 1]")
    if target_bits is not None and not 0 < target_bits <= 16:
        raise SpectraInputError(f"--target-bits {target_bits}: must be in (0, 16]")
    floors = floors or Floors()
    if floors.preset is not None and "quant" not in parts(method):
        raise SpectraInputError(
            f"--preset {floors.preset}: a quant preset; use it with --method quant or mixed"
        )
    strategy = strategy or Strategy()
    rule = strategy.rule
    if rule.needs_calibration:  # before any work: its scores read the calibration
        try:
            model.tokenizer()
        except SpectraInputError as e:
            raise SpectraInputError(
                f"--allocate {rule.name} needs a calibration of the model: {e}"
            ) from e
    importance = importance and rule.by_loss
    shapes = [m for m in model.matrices if m.role not in NOT_TARGETABLE]
    if floors.keep_dense is not None and not any(
        floors.keep_dense.fullmatch(m.name) for m in shapes
    ):
        raise SpectraInputError(f"--keep-dense {floors.keep_dense.pattern!r}: matches no module")
    key = "params" if target_params is not None else "bits"
    target = target_params if key == "params" else target_bits
    total = sum(m.shape[0] * m.shape[1] for m in shapes)
    budget = math.floor(target * total)
    _check_reachable(cheapest(shapes, method, floors, key), budget, total, key, target, method)
    modules = load_modules(shapes)
    seconds = {}
    dmg = cands.Damage()
    calib_block = None  # the plan's calibration block: the one its damage was scored on
    if sensitivity != "none":
        t = time.perf_counter()
        settings = sens_settings or sens.SensitivitySettings(kind=sensitivity)
        if settings.kind != sensitivity:
            raise ValueError("sens_settings.kind differs from sensitivity")
        kind = sens.KINDS[sensitivity]
        dmg, calib_block = kind.damage(model, settings, use_cache, progress, network, importance)
        seconds["sensitivity"] = time.perf_counter() - t
    t = time.perf_counter()
    sigmas = None
    if dmg.spectral and any(METHODS[p].spectral for p in parts(method)):
        sigmas = spectra_by_name(model, use_cache)
    units = cands.units_for(modules, method, dmg, floors, sigmas, progress)
    seconds["candidates"] = time.perf_counter() - t
    t = time.perf_counter()
    record = None
    if rule.by_loss:
        # relative calibration-weighted errors compare within a role, not across roles
        chosen = (allocate if dmg.absolute else allocate_by_role)(units, budget, key)
    else:
        values, windows = {}, None  # windows: the calibration a rule's scores read
        if rule.scores is not None:
            scoring = Scoring(model, units, modules, dmg, calib_block, strategy, use_cache, network)
            values, windows = rule.scores(scoring)
        free = METHODS[method].data_free_e if method in METHODS and dmg.hessian is None else None
        chosen, record = allocate_strategy(strategy, units, budget, key, values, free)
        if windows is not None:
            record["calibration"] = windows
    seconds["allocate"] = time.perf_counter() - t
    seconds["total"] = time.perf_counter() - t0
    layers, shapes = {}, {}
    shape_of = {m.name: m.shape for m in modules}
    for u, c in zip(units, chosen, strict=True):
        if c.config is not None:
            for name in u.names:
                layers[name], shapes[name] = c.config, shape_of[name]
    plan = Plan(model=model.spec, layers=layers, shapes=shapes)
    if calib_block is not None:
        plan = dataclasses.replace(plan, calibration=calib_block)
    if record is not None:
        plan = dataclasses.replace(plan, allocation=record)
    return AutoResult(
        method, sensitivity, plan, units, chosen, key, budget, total, seconds, strategy.name
    )
