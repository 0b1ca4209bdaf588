"""What a compression method tells the rest of Spectra about itself: one `Method`.

A method module ends with `METHOD = Method(...)`: its config class and `compress`, how
it uses calibration, its knobs (the app's widgets and the plan reference read them),
the settings it offers one module for allocation (`grid`) and each setting's damage
(`candidates`), which modules it treats together (`families`), the factorization
classes it returns (what a saved OUT names), whether `mixed` allocation offers it, its
sensitivity probes and how each export stores it. What healing trains is said by those
factorization classes (compressors.base.Factorization). `compressors.registry`
registers it; planning, previews, io, healing, exports, the CLI and the app loop over
the registry and never name a method.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field, fields

import torch

DATA = ("never", "optional", "whiten", "required")  # how a method uses calibration
KINDS = ("int", "float", "bool", "choice")
SCOPES = ("module", "block")  # what a plan's targets name for a method


@dataclass(frozen=True)
class Knob:
    """One setting of a method, as a plan writes it and the app edits it.

    Attributes:
        name: the config field (the plan key).
        help: one line: what it does.
        default: the config's default (None: unset, e.g. rank when energy is given).
        kind: "int", "float", "bool" or "choice".
        low: least value (int, float), inclusive.
        high: largest value (int, float): inclusive for ints, exclusive for floats
            below 1 such as sparsity (see `help`).
        choices: the values a "choice" takes.
        overrides: knobs that this one replaces when both are set in the app's
            table (energy replaces rank, a pattern fixes the sparsity).
    """

    name: str
    help: str
    default: object = None
    kind: str = "int"
    low: float | None = None
    high: float | None = None
    choices: tuple = ()
    overrides: tuple[str, ...] = ()

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"knob {self.name}: kind {self.kind!r} not in {KINDS}")


@dataclass(frozen=True)
class Floor:
    """What the plan's floors ask of one module (its role's): a least rank as a
    fraction of min(m, n), least bits, and a preset that narrows a method's grid to
    what one engine keeps exactly."""

    rank: float = 0.0
    bits: int = 0
    preset: str | None = None  # a named restriction of the grid (quant: "llama.cpp")

    def min_rank(self, full: int) -> int:
        return max(1, math.ceil(self.rank * full))


def _no_defaults(m: int, n: int) -> dict:
    return {}


@dataclass(frozen=True)
class Method:
    """One compression method, registered once (compressors.registry.register).

    Attributes:
        name: the plan's `method:` value.
        config_cls: the frozen, self-validating config dataclass.
        compress: compress(weight, config, calib=None) -> Factorization.
        summary: one line: what it stores.
        paper: the citation ("" for baselines).
        data: how it uses calibration: "never", "optional" (a flag makes it
            data-aware), "whiten" (whiten: true makes it data-aware) or "required".
        knobs: every config field, in the order a plan lists them.
        flags: the config fields that make it data-aware; the first is the app's
            "calibrated" switch.
        columns: the knobs the app's per-module table shows.
        defaults: defaults(m, n) -> the settings a newly chosen method starts from
            for an (m, n) module in the app.
        grid: grid(m, n, floor, spectral) -> configs offered to one module by
            allocation (None: not offered by `plan auto`).
        candidates: candidates(mod, damage, floor, sigma=None, quick=False) ->
            [(config, damage)] (mod: name, role, weight; damage: see
            spectra.plan.candidates.Damage; sigma: the weight's singular values when
            known; quick: the cheaper set that `mixed` allocation asks for).
        spectral: candidates read `sigma` under weight damage (plan auto passes the
            cached spectra).
        families: roles whose siblings under one parent a plan treats together, one
            factorization for them all (joint: ("q", "k", "v"), ("gate", "up"); a width
            method would name ("gate", "up", "down") and ("q", "k", "v", "o")); empty:
            every module alone. compressors.registry.groups reads it.
        group_grid: group_grid(shapes, floors, spectral) -> configs for a family group.
        group_candidates: group_candidates(group, damage, floors) -> [(config, damage)].
        member_costs: member_costs(config, shapes) -> [(params, bits)] per member of a
            group (what a plan's resolved table shows per module).
        alone: alone(config, shape) -> the config a lone member stands for in a one-module
            preview (joint's member alone is its own rank-k SVD).
        errors: errors(config, weight, sigma, calib, curves) -> (weight error,
            calibration-weighted error or None), or None where one compression is
            needed: previews read closed forms (a spectrum) through it.
        curves: curves(weight, hessian, whiten) -> (weight errors, calibration-weighted
            errors) at every rank of the whitened or plain form, which `errors` reads
            for a setting of that form (one factorization serves every rank of a
            module in the app).
        factorizations: the Factorization classes `compress` returns: a saved OUT
            names them and io rebuilds them from the registry; exports find a stored
            module's method by them.
        mixed: `plan auto --method mixed` offers this method's grid to every module.
        probes: {probe name: probe(m, n) -> config}: settings that the `ppl`
            sensitivity applies to one (m, n) module to measure its damage.
        exports: {format: why}: how each export (spectra.export.FORMATS) stores a
            module of this method. A string: it is written dense, for that reason;
            a callable why(f) -> reason or None, where None means the format's own
            layout holds it (compressed-tensors: a quantized grid); a format not named
            is written dense with no reason given (hf, gguf: every module is
            reconstructed).
        data_free_e: AlphaPruning's band e (`--allocate alpha|farms`) when this
            method's candidates are data-free (None: the calibrated default, 0.2).
        scope: what a plan's targets name: "module" (a linear module, compressed by
            `compress`) or "block" (a decoder block, reshaped as a whole: width; its
            `compress` is never called per weight, and a block's modules may carry a
            module-scope method as well, applied to their new shapes).
        reads_data: reads_data(config) -> whether it reads calibration, where `data`
            and `flags` cannot say (width: its `select` choice); None: they say.
    """

    name: str
    config_cls: type
    compress: Callable
    summary: str
    paper: str
    data: str
    knobs: tuple[Knob, ...]
    flags: tuple[str, ...] = ()
    columns: tuple[str, ...] = ()
    defaults: Callable[[int, int], dict] = _no_defaults
    grid: Callable | None = None
    candidates: Callable | None = None
    spectral: bool = False
    families: tuple[tuple[str, ...], ...] = ()
    group_grid: Callable | None = None
    group_candidates: Callable | None = None
    member_costs: Callable | None = None
    alone: Callable | None = None
    errors: Callable | None = None
    curves: Callable | None = None
    factorizations: tuple[type, ...] = ()
    mixed: bool = False
    probes: dict[str, Callable] = field(default_factory=dict, hash=False, compare=False)
    exports: dict[str, object] = field(default_factory=dict, hash=False, compare=False)
    data_free_e: float | None = None
    scope: str = "module"
    reads_data: Callable | None = None

    def __post_init__(self):
        if self.scope not in SCOPES:
            raise ValueError(f"method {self.name}: scope {self.scope!r} not in {SCOPES}")
        if self.data not in DATA:
            raise ValueError(f"method {self.name}: data {self.data!r} not in {DATA}")
        if getattr(self.config_cls, "method", None) != self.name:
            raise ValueError(f"method {self.name}: {self.config_cls.__name__}.method differs")
        names = [f.name for f in fields(self.config_cls)]
        if [k.name for k in self.knobs] != names:
            raise ValueError(f"method {self.name}: knobs must be the config's fields {names}")
        for k in (*self.flags, *self.columns):
            if k not in names:
                raise ValueError(f"method {self.name}: {k!r} is not a knob")

    @property
    def switch(self) -> str | None:
        """The config field the app's "calibrated" toggles (None: no switch)."""
        return self.flags[0] if self.flags else None

    @property
    def grouped(self) -> bool:
        return bool(self.families)

    def needs_data(self, config) -> bool:
        """Whether `config` reads calibration (H = X^T X of the module's inputs)."""
        if self.reads_data is not None:
            return bool(self.reads_data(config))
        if self.data == "required":
            return True
        return any(bool(getattr(config, f)) for f in self.flags)

    def knob(self, name: str) -> Knob:
        return next(k for k in self.knobs if k.name == name)

    def family(self, role: str) -> tuple[str, ...] | None:
        """The family of `role` (None: a module of that role stands alone)."""
        return next((f for f in self.families if role in f), None)


# helpers that several methods' damages share


def tail_sums(terms: torch.Tensor) -> list[float]:
    """t[k] = sum of terms[k:], for k = 0..len(terms) (the last is 0)."""
    t = terms.double()
    return torch.flip(torch.cumsum(torch.flip(t, (0,)), 0), (0,)).tolist() + [0.0]


def residuals(w: torch.Tensor):
    """residual(r) = W - W_r (best rank-r approximation), one SVD, each rank once."""
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    return functools.cache(lambda r: w - (u[:, :r] * s[:r]) @ vh[:r])


def break_even_rank(m: int, n: int) -> int:
    """The largest rank whose two factors store fewer numbers than the (m, n) W."""
    return (m * n - 1) // (m + n)
