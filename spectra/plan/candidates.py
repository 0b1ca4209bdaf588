"""Candidate settings per module, with exact costs and predicted damage, for allocation.

Costs come from each method's own `cost(m, n)`, so a plan built from the chosen
candidates has exactly the accounted budget. Damage is one of:
- weight (`--sensitivity none`): ||W - W_hat||_F^2 / ||W||_F^2, the squared relative
  weight error. Relative, because each layer's scale is arbitrary after a norm.
- fisher: 0.5 * sum F (W - W_hat)^2, the loss increase predicted by the diagonal
  empirical Fisher (spectra.plan.sensitivity).
- calib: 0.5 * sum_i F_i (E H E^T)_ii / rows with H = X^T X of the module's
  calibration inputs and F_i the mean squared loss gradient of output i
  (spectra.plan.sensitivity.output_fisher): the calibration-weighted error as a
  second-order loss estimate, comparable across modules (closed form over the
  activation-aware spectrum for whitened low rank and joint). Modules outside the
  transformer blocks (an untied LM head) have no H: 0.5 * sum_ij F_i A_j E_ij^2 with
  A_j the mean squared input. Without F (`importance=False`) it is the relative
  tr(E H E^T) / tr(W H W^T), which compares within a role only (allocated so).
- ppl: the squared relative error scaled by the module's measured loss increase at a
  probe setting: s_j * err^2 / err_probe^2.
Each method's settings and their damage are its own (`grid` and `candidates` of its
registered description, in its module under compressors/): closed forms where the
damage allows (tails of the spectrum for low rank and joint, sorted magnitudes for
pruning, TT-SVD bond tails for mpo), else the error of the setting as built. Under
calib damage each module with an H is offered the calibrated form of its method
(at equal cost it is never worse in that damage). `mixed` offers lowrank, quant and
prune candidates to every module (the quick set: Wanda without SparseGPT). Every
module may also stay dense.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from compressors.base import DENSE_BITS, Calibration
from compressors.registry import METHODS
from spectra.linalg.parallel import map_by_size
from spectra.plan.allocate import Candidate, Unit
from spectra.plan.grid import Floors, group_modules, parts


@dataclass
class Module:
    """One linear module for allocation. `source` is its (out, in) float32 weight, or a
    function that reads it (then give `dims`): such a module is read while its
    candidates are built (`held`) and released after, so allocating a big model holds
    a few weights at a time, not the model."""

    name: str
    role: str
    block: int | None
    source: torch.Tensor | Callable[[], torch.Tensor]
    dims: tuple[int, int] | None = None
    _held: torch.Tensor | None = field(default=None, repr=False, compare=False)

    @property
    def weight(self) -> torch.Tensor:
        if isinstance(self.source, torch.Tensor):
            return self.source
        return self._held if self._held is not None else self.source()

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.dims if self.dims is not None else self.source.shape)

    @contextlib.contextmanager
    def held(self):
        """The weight read once for the duration (a no-op for an in-memory one)."""
        if isinstance(self.source, torch.Tensor) or self._held is not None:
            yield
            return
        self._held = self.source()
        try:
            yield
        finally:
            self._held = None


class Damage:
    """Damage of an error matrix; see the module docstring.

    `hessian`: {name: H} for calibration-weighted damage; with `importance`
    ({name: (F, A)}, spectra.plan.sensitivity.output_fisher) and `rows` (H's row
    count) it is the predicted loss increase 0.5 * sum_i F_i (E H E^T)_ii / rows
    instead of the relative error.
    """

    def __init__(
        self,
        fisher: dict | None = None,
        scale: dict | None = None,
        hessian: dict | None = None,
        importance: dict | None = None,
        rows: int = 1,
    ):
        self.fisher, self.scale, self.hessian = fisher, scale or {}, hessian
        self.importance, self.rows = importance, rows
        self._den: dict[str, float] = {}

    @property
    def spectral(self) -> bool:
        """Damage depends only on ||E||_F (closed forms from spectra apply)."""
        return self.fisher is None and self.hessian is None

    @property
    def absolute(self) -> bool:
        """Damages are loss estimates that compare across modules (else relative
        calibration-weighted errors, which compare within a role)."""
        return self.importance is not None or self.hessian is None

    def calib(self, mod: Module) -> Calibration | None:
        """The module's calibration when damage is calibration-weighted and it has an H
        (then its method's calibrated form is offered)."""
        if self.hessian is None or mod.name not in self.hessian:
            return None
        return Calibration(self.hessian[mod.name], 0)

    def release(self) -> None:
        """Drop the blocks of H held for reuse (spectra.data.grams.Hessians): a module
        outside the calibration (a head) needs none of them beside its own weight."""
        release = getattr(self.hessian, "release", None)
        if release is not None:
            release()

    def out_weights(self, mod: Module) -> torch.Tensor | None:
        """0.5 F / rows per output row (loss per unit of row-wise H-error), if known."""
        if self.importance is None or mod.name not in self.importance:
            return None
        return self.importance[mod.name][0].double() * (0.5 / max(self.rows, 1))

    def whitened_terms(self, mod: Module, p: torch.Tensor) -> torch.Tensor:
        """Damage of each column of P = E L (an error in whitened coordinates, so
        E H E^T = P P^T) for `mod`; summed, the damage of E."""
        g = self.out_weights(mod)
        if g is not None:
            return g @ p.double().pow(2)
        return p.double().pow(2).sum(0) / max(self._norm_h(mod), 1e-300)

    def _norm_h(self, mod: Module) -> float:
        if mod.name not in self._den:  # tr(W H W^T), a few thousand rows at a time
            h, w = self.hessian[mod.name], mod.weight
            self._den[mod.name] = sum(
                float(((c @ h) * c).sum(dtype=torch.float64))
                for c in (w[lo : lo + 8192].to(h.dtype) for lo in range(0, w.shape[0], 8192))
            )
        return self._den[mod.name]

    def h_weighted(self, mod: Module, e: torch.Tensor) -> float:
        """tr(E H E^T) / tr(W H W^T), the calibration-weighted squared relative error;
        with importance, 0.5 * sum_i F_i (E H E^T)_ii / rows."""
        h = self.hessian[mod.name]
        rowwise = ((e.to(h.dtype) @ h) * e.to(h.dtype)).sum(1, dtype=torch.float64)
        g = self.out_weights(mod)
        if g is not None:
            return float(g @ rowwise)
        return float(rowwise.sum()) / max(self._norm_h(mod), 1e-300)

    def calib_relative(self, mod: Module, err2: float, norm2: float) -> float:
        """A relative calibration-weighted error err2 / norm2 as damage: with
        importance, scaled by the damage of losing the module's output entirely."""
        rel = err2 / max(norm2, 1e-300)
        if self.out_weights(mod) is None:
            return rel
        return rel * self.h_weighted(mod, mod.weight.double())

    def projected(self, mod: Module, v: torch.Tensor, ranks: list[int], gram) -> list | None:
        """Damage of E = W (I - V_r V_r^T) at each rank r, the plain low-rank error of
        a tall module (V: W's right singular vectors, `gram`: W^T W), from n x n
        matrices only; None when the damage needs E itself (an H, or a full Fisher)."""
        from compressors.gram_route import grams

        if (self.hessian is not None and mod.name in self.hessian) or (
            self.fisher is not None and (self.importance is None or mod.name not in self.importance)
        ):
            return None
        if self.importance is not None and mod.name in self.importance:
            # 0.5 sum_ij f_i a_j E_ij^2 = 0.5 tr(A Q G_f Q), Q = I - V_r V_r^T
            f, a = self.importance[mod.name]
            g, a = grams(mod.weight, f.double()), a.double().to(v.device)
            out = []
            for r in ranks:
                vr = v[:, :r]
                gv, av = g @ vr, a[:, None] * vr
                cross = float((gv * av).sum())  # tr(V_r^T G A V_r)
                inner = float(((vr.T @ av) * (vr.T @ gv)).sum())  # tr(A P G P)
                out.append(0.5 * (float(torch.diagonal(g) @ a) - 2 * cross + inner))
            return out
        total = float(torch.trace(gram))  # ||E||^2 = tr(G) - tr(V_r^T G V_r)
        return [
            self.relative(mod.name, total - float(((gram @ v[:, :r]) * v[:, :r]).sum()), total)
            for r in ranks
        ]

    def relative(self, name: str, err2: float, norm2: float) -> float:
        return self.scale.get(name, 1.0) * err2 / max(norm2, 1e-300)

    def __call__(self, mod: Module, e: torch.Tensor) -> float:
        if self.hessian is not None and mod.name in self.hessian:
            return self.h_weighted(mod, e)
        if self.importance is not None and mod.name in self.importance:
            f, a = self.importance[mod.name]  # no H: its diagonal A
            e2 = e.double().pow(2)
            return 0.5 * float(f.double() @ e2 @ a.double())
        if self.fisher is None:
            return self.relative(mod.name, float(e.double().pow(2).sum()), _norm2(mod.weight))
        f = self.fisher[mod.name]
        return 0.5 * float((f * e.to(f.dtype).pow(2)).sum(dtype=torch.float64))


class Weights(Mapping):
    """{name: weight} over allocation modules, each read when asked for (never all
    of a big model at once)."""

    def __init__(self, modules: list[Module]):
        self.modules = {m.name: m for m in modules}

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.modules[name].weight

    def __iter__(self):
        return iter(self.modules)

    def __len__(self) -> int:
        return len(self.modules)


def _norm2(w: torch.Tensor) -> float:
    return float(w.double().pow(2).sum())


def dense(m: int, n: int) -> Candidate:
    return Candidate(None, m * n, DENSE_BITS * m * n, 0.0)


def _cand(config, m: int, n: int, damage: float) -> Candidate:
    p, b = config.cost(m, n)
    return Candidate(config, p, b, damage)


def candidates(method: str, group: list[Module], dmg: Damage, floors: Floors, sigma=None):
    """Candidates (dense aside) of one allocation unit: a family group of a grouped
    method, else one module under each of the methods `method` offers."""
    m, n = sum(g.shape[0] for g in group), group[0].shape[1]
    if len(group) > 1:
        floor = [floors.of(g.role) for g in group]
        got = METHODS[method].group_candidates(group, dmg, floor)
    else:
        mod, quick = group[0], len(parts(method)) > 1
        got = [
            pair
            for part in parts(method)
            for pair in METHODS[part].candidates(mod, dmg, floors.of(mod.role), sigma, quick)
        ]
    return [_cand(config, m, n, d) for config, d in got]


def units_for(
    modules: list[Module],
    method: str,
    dmg: Damage,
    floors: Floors,
    sigmas: dict | None = None,
    progress=None,
) -> list[Unit]:
    """Allocation units with their candidates (dense included) for `method`.

    `sigmas`: singular values by module name, when known (spares an SVD per module);
    `progress(done, total, what)` hears each unit, from the calling thread.
    """
    sigmas = sigmas or {}

    kept = floors.keep_dense
    groups = group_modules(modules, method)

    def build(group: list[Module]) -> Unit:
        m_total = sum(g.shape[0] for g in group)
        n = group[0].shape[1]
        unit = Unit(
            tuple(g.name for g in group),
            [],
            m_total * n,
            group[0].role,
            group[0].block,
        )
        base = dense(m_total, n)
        if kept is not None and all(kept.fullmatch(g.name) for g in group):
            unit.candidates = [base]
            return unit
        if dmg.hessian is not None and all(g.name not in dmg.hessian for g in group):
            dmg.release()  # an 8B head: 2.1 GB of float32, without 2 GB of Grams beside it
        with contextlib.ExitStack() as stack:  # the group's weights, read for its candidates
            for g in group:
                stack.enter_context(g.held())
            cands = candidates(method, group, dmg, floors, sigmas.get(group[0].name))
        unit.candidates = [base, *cands]
        return unit

    units = {}
    order = {id(g): i for i, g in enumerate(groups)}
    size = lambda group: sum(g.shape[0] for g in group) * group[0].shape[1]  # noqa: E731
    for group, unit in map_by_size(build, groups, size):  # progress from this thread
        units[order[id(group)]] = unit
        if progress:
            progress(len(units), len(groups), f"candidates {unit.names[0]}")
    return [units[i] for i in range(len(groups))]
