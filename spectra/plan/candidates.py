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
Low-rank, joint and pruning candidates under a weight-type damage are read off the
spectrum or the sorted magnitudes in closed form; all others reconstruct W_hat.

Under calib damage each module with an H is offered the calibrated form of its
method instead (at equal cost it is never worse in that damage): whitened low rank
and joint, damage exactly the tail of the activation-aware spectrum (singular
values of W L, resp. of the stacked [W_i L]); whitened losparse (one SVD of W L per
module, the residual kept by Wanda's score); whitened mpo, damage by the TT-SVD
bound of W D with the activation column norms D = diag(H)^(1/2) (the diagonal part of
H; the built form adds H-weighted sweeps and does better); GPTQ for quant, Wanda and
SparseGPT for prune (Wanda only within `mixed`), each damage measured on its result.

Candidate grids: every rank for low rank and joint under weight-type damage (the
allocation is then the exact greedy over singular values), 48 ranks otherwise; quant
bits 2..8 (group 128); prune sparsity 0.1..0.95; losparse ranks 1/16..1/2 of the
break-even rank x sparsity 0.9..0.99; mpo 3 cores x 12 bond dimensions, damage by the
TT-SVD bound sum of squared bond tails (exact for one bond); caldera bits 2..4 x rank
16..64, damage by a data-free proxy W_r + RTN(W - W_r) at the same bits (the real
CALDERA error is smaller; the proxy orders the settings). `mixed` offers lowrank,
quant and prune candidates to every module. Every module may also stay dense.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

from compressors.base import DENSE_BITS, Calibration, whitening_factor
from compressors.quant import hessian_inverse_factor
from compressors.registry import compress, make_config
from spectra.linalg import mpo as tt
from spectra.linalg.parallel import parallel_map
from spectra.plan.allocate import Candidate, Unit
from spectra.plan.grid import (
    MPO_CORES,
    Floors,
    grid,
    group_modules,
    joint_grid,
)


@dataclass
class Module:
    name: str
    role: str
    block: int | None
    weight: torch.Tensor  # (out, in) float32

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.weight.shape)


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
        if mod.name not in self._den:
            h = self.hessian[mod.name]
            w = mod.weight.to(h.dtype)
            self._den[mod.name] = float(((w @ h) * w).sum(dtype=torch.float64))
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


def _norm2(w: torch.Tensor) -> float:
    return float(w.double().pow(2).sum())


def dense(m: int, n: int) -> Candidate:
    return Candidate(None, m * n, DENSE_BITS * m * n, 0.0)


def _cand(config, m: int, n: int, damage: float) -> Candidate:
    p, b = config.cost(m, n)
    return Candidate(config, p, b, damage)


def _error(w: torch.Tensor, config) -> torch.Tensor:
    """W - W_hat for what `config` builds: the registry's own compressor."""

    return w - compress(w, config).to_dense().to(w.dtype)


def _tail_sums(terms: torch.Tensor) -> list[float]:
    """t[k] = sum of terms[k:], for k = 0..len(terms) (the last is 0)."""
    t = terms.double()
    return torch.flip(torch.cumsum(torch.flip(t, (0,)), 0), (0,)).tolist() + [0.0]


def lowrank(mod: Module, dmg: Damage, floors: Floors, sigma=None) -> list[Candidate]:
    """`sigma`: the weight's singular values when known (the analysis cache has them)."""
    m, n = mod.shape
    closed = dmg.spectral or dmg.calib(mod) is not None  # every rank costs a tail sum
    ranks = [c.rank for c in grid("lowrank", m, n, mod.role, floors, closed)]
    if not ranks:
        return []
    out = []
    if dmg.spectral:
        if sigma is None:
            sigma = torch.linalg.svdvals(mod.weight.double())
        tail = _tail_sums(torch.as_tensor(np.asarray(sigma), dtype=torch.float64).pow(2))
        for r in ranks:
            d = dmg.relative(mod.name, tail[r], tail[0])
            out.append(_cand(make_config("lowrank", rank=r), m, n, d))
        return out
    calib = dmg.calib(mod)
    if calib is not None:
        # whitened: ||(W - W_r) X^T||_F^2 = sum_{i>r} s_i^2 of W L (activation-aware
        # spectrum); with output weights, component i costs s_i^2 * sum_j g_j u_ji^2
        chol = whitening_factor("lowrank", calib)
        white = mod.weight.double() @ chol
        if dmg.out_weights(mod) is None:  # the singular values are enough
            s2 = torch.linalg.svdvals(white).pow(2)
            tail = _tail_sums(s2 / s2.sum())
        else:
            u, s, _ = torch.linalg.svd(white, full_matrices=False)
            tail = _tail_sums(dmg.whitened_terms(mod, u * s))
        return [_cand(make_config("lowrank", rank=r, whiten=True), m, n, tail[r]) for r in ranks]
    u, s, vh = _svd(mod.weight)
    e = mod.weight.clone()
    done = 0
    for r in ranks:
        e -= (u[:, done:r] * s[done:r]) @ vh[done:r]
        done = r
        out.append(_cand(make_config("lowrank", rank=r), m, n, dmg(mod, e)))
    return out


def quant(mod: Module, dmg: Damage, floors: Floors) -> list[Candidate]:
    m, n = mod.shape
    calib = dmg.calib(mod)
    if calib is not None:  # GPTQ: one inverse-Hessian factor for every bit width
        from compressors.quant import dequantize, ldlq

        factor = hessian_inverse_factor(calib.hessian)
        out = []
        for config in grid("quant", m, n, mod.role, floors):
            config = make_config("quant", bits=config.bits, group_size=config.group_size, gptq=True)
            codes, scale, zero = ldlq(
                mod.weight.double(), calib.hessian, config.bits, config.group_size, factor=factor
            )
            w_hat = dequantize(codes, scale, zero, config.group_size)
            out.append(_cand(config, m, n, dmg(mod, mod.weight.double() - w_hat)))
        return out
    return [
        _cand(config, m, n, dmg(mod, _error(mod.weight, config)))
        for config in grid("quant", m, n, mod.role, floors)
    ]


def prune(mod: Module, dmg: Damage, floors: Floors, sparsegpt: bool = True) -> list[Candidate]:
    """`sparsegpt`: under calib damage offer SparseGPT beside Wanda (one OBS
    reconstruction per sparsity; `mixed` leaves it out to stay quick)."""
    m, n = mod.shape
    configs = grid("prune", m, n, mod.role, floors)
    if not configs:
        return []
    calib = dmg.calib(mod)
    if calib is not None:  # Wanda: |W| ||X_j|| per output row; SparseGPT: OBS under H
        kinds = ("wanda", "sparsegpt") if sparsegpt else ("wanda",)
        out = []
        for config in configs:
            for kind in kinds:
                config = make_config("prune", sparsity=config.sparsity, **{kind: True})
                kept = compress(mod.weight, config, calib).to_dense()
                e = mod.weight - kept.to(mod.weight.dtype)
                out.append(_cand(config, m, n, dmg(mod, e)))
        return out + _semi_structured(mod, dmg, kinds, calib)
    mags = mod.weight.reshape(-1).abs()
    order = torch.argsort(mags)
    sq = mags[order].double().pow(2)
    cum = torch.cumsum(sq, 0)
    out = []
    for config in configs:
        k = round(config.sparsity * m * n)  # the k smallest magnitudes are zeroed
        if dmg.spectral:
            d = dmg.relative(mod.name, float(cum[k - 1]) if k else 0.0, float(cum[-1]))
        else:
            e = torch.zeros(m * n)
            e[order[:k]] = mod.weight.reshape(-1)[order[:k]]
            d = dmg(mod, e.reshape(m, n))
        out.append(_cand(config, m, n, d))
    return out + _semi_structured(mod, dmg, ("magnitude",), None)


def _semi_structured(mod: Module, dmg: Damage, kinds, calib) -> list[Candidate]:
    """The 2:4 pattern that engines accelerate, for each scorer, where the row divides."""
    m, n = mod.shape
    if n % 4:
        return []
    out = []
    for kind in kinds:
        knobs = {} if kind == "magnitude" else {kind: True}
        config = make_config("prune", pattern="2:4", **knobs)
        e = mod.weight - compress(mod.weight, config, calib).to_dense().to(mod.weight.dtype)
        if dmg.spectral:
            total = float(mod.weight.double().pow(2).sum())
            d = dmg.relative(mod.name, float(e.double().pow(2).sum()), total)
        else:
            d = dmg(mod, e)
        out.append(_cand(config, m, n, d))
    return out


def _residuals(w: torch.Tensor):
    """residual(r) = W - W_r (best rank-r approximation), one SVD, each rank once."""
    u, s, vh = _svd(w)
    return functools.cache(lambda r: w - (u[:, :r] * s[:r]) @ vh[:r])


def losparse(mod: Module, dmg: Damage, floors: Floors) -> list[Candidate]:
    m, n = mod.shape
    calib = dmg.calib(mod)
    if calib is not None:
        return _losparse_whitened(mod, dmg, floors, calib)
    residual = _residuals(mod.weight)
    order = functools.cache(lambda r: torch.argsort(residual(r).abs().reshape(-1), descending=True))
    out = []
    for config in grid("losparse", m, n, mod.role, floors):
        flat, largest = residual(config.rank).reshape(-1), order(config.rank)
        keep = m * n - round(config.sparsity * m * n)  # residual entries kept in S
        e = flat.clone()
        e[largest[:keep]] = 0  # the kept entries leave no error
        p, b = config.cost(m, n)
        out.append(Candidate(config, p, b, dmg(mod, e.reshape(m, n))))
    return out


def _losparse_whitened(mod: Module, dmg: Damage, floors: Floors, calib) -> list[Candidate]:
    """Whitened losparse (iters 0): U V = trunc_r(W L) L^{-1}, residual kept by Wanda score."""
    m, n = mod.shape
    w = mod.weight.double()
    chol = whitening_factor("losparse", calib)
    u, s, vh = torch.linalg.svd(w @ chol, full_matrices=False)
    back = torch.linalg.solve_triangular(chol, vh, upper=False, left=False)  # V^T L^{-1}
    col = chol.norm(dim=1)[None, :]
    out = []
    for config in grid("losparse", m, n, mod.role, floors):
        r = config.rank
        residual = w - (u[:, :r] * s[:r]) @ back[:r]
        keep = m * n - round(config.sparsity * m * n)
        largest = torch.argsort((residual.abs() * col).reshape(-1), descending=True)
        e = residual.reshape(-1).clone()
        e[largest[:keep]] = 0
        config = make_config(
            "losparse", rank=r, sparsity=config.sparsity, structured=config.structured, whiten=True
        )
        out.append(_cand(config, m, n, dmg(mod, e.reshape(m, n))))
    return out


def mpo(mod: Module, dmg: Damage, floors: Floors) -> list[Candidate]:
    m, n = mod.shape
    mf, nf = tt.factorize(m, MPO_CORES), tt.factorize(n, MPO_CORES)
    w = mod.weight.double().numpy()
    calib = dmg.calib(mod)
    if calib is not None:
        return _mpo_calibrated(mod, dmg, floors, calib, mf, nf)
    spectra = tt.bond_spectra(w, mf, nf) if dmg.spectral else None
    out = []
    for config in grid("mpo", m, n, mod.role, floors):
        p, b = config.cost(m, n)
        if dmg.spectral:
            err2 = sum(float(np.sum(s[config.bond_dim :] ** 2)) for s in spectra)
            d = dmg.relative(mod.name, err2, float(np.sum(w * w)))
        else:
            d = dmg(mod, _error(mod.weight, config))
        out.append(Candidate(config, p, b, d))
    return out


def _mpo_calibrated(mod, dmg, floors, calib, mf, nf) -> list[Candidate]:
    """Calibrated mpo, damage by the TT-SVD bound of W D with D = diag(H)^(1/2)."""
    m, n = mod.shape
    d = calib.col_norms.double().clamp_min(1e-12)
    wd = (mod.weight.double() * d[None, :]).numpy()
    spectra = tt.bond_spectra(wd, mf, nf)
    total = float(np.sum(wd * wd))
    out = []
    for config in grid("mpo", m, n, mod.role, floors):
        config = make_config("mpo", cores=config.cores, bond_dim=config.bond_dim, whiten=True)
        p, b = config.cost(m, n)
        if p >= m * n:
            continue
        err2 = sum(float(np.sum(s[config.bond_dim :] ** 2)) for s in spectra)
        out.append(Candidate(config, p, b, dmg.calib_relative(mod, err2, total)))
    return out


def caldera(mod: Module, dmg: Damage, floors: Floors) -> list[Candidate]:
    m, n = mod.shape
    residual = _residuals(mod.weight)
    out = []
    for config in grid("caldera", m, n, mod.role, floors):
        p, b = config.cost(m, n)
        rtn = make_config("quant", bits=config.bits, group_size=config.group_size)
        out.append(Candidate(config, p, b, dmg(mod, _error(residual(config.rank), rtn))))
    return out


def joint(group: list[Module], dmg: Damage, floors: Floors) -> list[Candidate]:
    """Candidates for a group sharing V: cost and damage summed over its members."""
    n = group[0].shape[1]
    stacked = torch.cat([g.weight for g in group]).double()
    total_m = stacked.shape[0]
    closed = dmg.spectral or dmg.calib(group[0]) is not None
    configs = joint_grid([g.shape for g in group], [g.role for g in group], floors, closed)
    ks = [c.rank for c in configs]
    if not ks:
        return []
    calib = dmg.calib(group[0])
    if calib is not None:
        return _joint_whitened(group, dmg, ks, calib)
    _, _, vh = torch.linalg.svd(stacked, full_matrices=False)
    v = vh.T  # (n, min)
    out = []
    projections = [g.weight.double() @ v for g in group]  # W_i V
    if dmg.spectral:
        cums = [torch.cumsum(p.pow(2).sum(0), 0) for p in projections]
        norms = [_norm2(g.weight) for g in group]
    for k in ks:
        config = make_config("joint", rank=k)
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
        out.append(_cand(config, total_m, n, d))
    return out


def _joint_whitened(group: list[Module], dmg: Damage, ks: list[int], calib) -> list[Candidate]:
    """Whitened joint: member i's error at rank k is ||W_i L||^2 - ||W_i L Q_k||^2."""
    chol = whitening_factor("joint", calib)
    white = [g.weight.double() @ chol for g in group]
    _, _, vh = torch.linalg.svd(torch.cat(white), full_matrices=False)
    # member i's whitened error at rank k: the columns k.. of W_i L Q (plus what lies
    # outside Q's span, which is nothing when the stack has full column rank)
    terms = [dmg.whitened_terms(g, x @ vh.T) for g, x in zip(group, white, strict=True)]
    norms = [float(dmg.whitened_terms(g, x).sum()) for g, x in zip(group, white, strict=True)]
    cums = [torch.cumsum(t, 0) for t in terms]
    total_m, n = sum(g.shape[0] for g in group), group[0].shape[1]
    out = []
    for k in ks:
        d = sum(max(nrm - float(c[k - 1]), 0.0) for c, nrm in zip(cums, norms, strict=True))
        out.append(_cand(make_config("joint", rank=k, whiten=True), total_m, n, d))
    return out


def _svd(w: torch.Tensor):
    return torch.linalg.svd(w, full_matrices=False)


def units_for(
    modules: list[Module], method: str, dmg: Damage, floors: Floors, sigmas: dict | None = None
) -> list[Unit]:
    """Allocation units with their candidates (dense included) for `method`.

    `sigmas`: singular values by module name, when known (spares an SVD per module).
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
        mod = group[0]
        if len(group) > 1:
            cands = joint(group, dmg, floors)
        elif method in ("lowrank", "joint"):
            cands = lowrank(mod, dmg, floors, sigmas.get(mod.name))
        elif method == "quant":
            cands = quant(mod, dmg, floors)
        elif method == "mpo":
            cands = mpo(mod, dmg, floors)
        elif method == "losparse":
            cands = losparse(mod, dmg, floors)
        elif method == "caldera":
            cands = caldera(mod, dmg, floors)
        elif method == "mixed":
            cands = lowrank(mod, dmg, floors, sigmas.get(mod.name))
            cands += quant(mod, dmg, floors) + prune(mod, dmg, floors, sparsegpt=False)
        else:
            raise ValueError(method)
        unit.candidates = [base, *cands]
        return unit

    return list(parallel_map(build, groups))
