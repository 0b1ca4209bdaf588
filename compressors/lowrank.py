"""Low-rank SVD: W ~ A B with A (m, r), B (r, n).

Plain: the truncated SVD, optimal in Frobenius and spectral norm (Eckart-Young).
Whitened (`whiten: true`, SVD-LLM, Wang et al. 2024): with calibration activations
X and H = X^T X = L L^T (Cholesky), the rank-r W' minimising ||(W - W') X^T||_F is
trunc_r(W L) L^{-1}. When H is not positive definite a growing multiple of its mean
diagonal is added until the Cholesky succeeds (the jitter is recorded).
`factor_bits` < 16 stores A and B as group-wise codes (compressors.factors).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from torch import nn

from compressors import factors
from compressors.base import (
    Calibration,
    Factorization,
    check_rank,
    config_error,
    whitening_factor,
)
from compressors.gram_route import ROWS, grams, tall_eigh, tall_terms, wide_eigh, wide_gram
from compressors.method import Floor, Knob, Method, break_even_rank, tail_sums
from spectra.linalg.metrics import energy_rank, rank_error_curve

GRID = 48  # ranks offered per module when each rank's damage costs a reconstruction


@dataclass(frozen=True)
class LowRankConfig:
    """Settings of `lowrank`.

    Attributes:
        rank: kept rank r (1..min(m, n)); give this or `energy`.
        energy: keep the smallest rank whose share of ||W||_F^2 reaches this fraction,
            in (0, 1]. Always the weight's own spectrum, also when whitened, so that a
            plan's budget is known from the spectra before any calibration.
        whiten: activation-aware truncation (needs calibration data).
        factor_bits: bits per entry of A and B, 2..8, or 16 (unquantized).
        factor_group_size: entries sharing a scale and zero point along a factor's rows.
    """

    method: ClassVar[str] = "lowrank"
    rank: int | None = None
    energy: float | None = None
    whiten: bool = False
    factor_bits: int = 16
    factor_group_size: int = 64

    def __post_init__(self):
        if (self.rank is None) == (self.energy is None):
            raise config_error(self.method, "rank", self.rank, "give exactly one of rank or energy")
        if self.rank is not None and (not isinstance(self.rank, int) or self.rank < 1):
            raise config_error(self.method, "rank", self.rank, "must be an integer >= 1")
        if self.energy is not None and not 0 < self.energy <= 1:
            raise config_error(self.method, "energy", self.energy, "must be in (0, 1]")
        factors.check(self.method, self.factor_bits, self.factor_group_size)

    def check_shape(self, m: int, n: int) -> None:
        if self.rank is not None:
            check_rank(self.method, self.rank, m, n)

    def cost(self, m: int, n: int, rank: int | None = None) -> tuple[int, int]:
        """(parameters, bits) for an (m, n) weight; `rank` resolves an `energy` setting."""
        r = self.rank if self.rank is not None else rank
        if r is None:
            raise ValueError("an energy setting needs the spectrum to know its rank")
        fb, gs = self.factor_bits, self.factor_group_size
        return r * (m + n), factors.factor_cost((m, r), fb, gs) + factors.factor_cost(
            (r, n), fb, gs
        )


@dataclass
class LowRank(factors.QuantizedFactors, Factorization):
    a: torch.Tensor | factors.QuantizedFactor  # (m, r)
    b: torch.Tensor | factors.QuantizedFactor  # (r, n)

    @property
    def shape(self):
        return (self.a.shape[0], self.b.shape[1])

    @property
    def rank(self) -> int:
        return self.a.shape[1]

    def to_dense(self):
        return factors.dense(self.a) @ factors.dense(self.b)

    @property
    def n_params(self):
        return self.rank * (self.shape[0] + self.shape[1])

    @property
    def bits(self):
        return factors.bits_of(self.a) + factors.bits_of(self.b)

    def as_module(self, bias=None):
        return LowRankLinear(self.a, self.b, bias)


class LowRankLinear(nn.Module):
    """y = (x B^T) A^T + b: two thin products, W never formed (quantized factors are
    dequantized in the forward)."""

    def __init__(self, a, b, bias=None):
        super().__init__()
        factors.hold(self, "a", a)
        factors.hold(self, "b", b)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def forward(self, x):
        a, b = factors.value(self, "a").to(x.dtype), factors.value(self, "b").to(x.dtype)
        return nn.functional.linear(nn.functional.linear(x, b), a, self.bias)


def compress(
    weight: torch.Tensor, config: LowRankConfig, calib: Calibration | None = None
) -> LowRank:
    """Truncated (optionally whitened) SVD of `weight` (out, in)."""
    m, n = weight.shape
    config.check_shape(m, n)
    if m > TALL * n:  # a head or an embedding: through n x n Grams
        return _tall_compress(weight, config, calib)
    w = weight.detach().to(torch.float64)
    r = config.rank
    if r is None:
        r = energy_rank(torch.linalg.svdvals(w).cpu().numpy(), config.energy)
    if config.whiten:
        if m <= n:  # U and S^2 of W L from the m x m W H W^T: no factor of H
            if calib is None:
                raise config_error("lowrank", "whiten", True, "needs calibration data")
            s2, u = wide_eigh(w, calib.hessian)
            s = s2.sqrt()
        else:
            chol = whitening_factor("lowrank", calib)
            wl = w @ chol
            del chol  # not needed again: B comes from W itself (below)
            u, s, _ = torch.linalg.svd(wl, full_matrices=False)
            del wl
        root = s[:r].sqrt()
        a = u[:, :r] * root
        # B = root V_r^T L^-1 = root^-1 U_r^T W, as W L = U S V^T: A B = U_r U_r^T W
        # projects W, and neither L nor its inverse is held beside the SVD
        inv = torch.where(root > 0, 1 / root, torch.zeros_like(root))
        b = inv[:, None] * (u[:, :r].T @ w)
    else:
        u, s, vt = torch.linalg.svd(w, full_matrices=False)
        root = s[:r].sqrt()
        a, b = u[:, :r] * root, root[:, None] * vt[:r]
    fb, gs = config.factor_bits, config.factor_group_size
    return LowRank(
        factors.quantize_factor(a.to(weight.dtype), fb, gs),
        factors.quantize_factor(b.to(weight.dtype), fb, gs),
    )


def _tall_compress(weight: torch.Tensor, config: LowRankConfig, calib) -> LowRank:
    """`compress` of an (m, n) weight with m >> n, never holding an m x n float64: with
    W L = U S V^T (L = I unwhitened), V and S^2 come from the n x n L^T W^T W L, then
    A = U_r S_r^(1/2) = W L V_r S_r^(-1/2) is computed ROWS rows at a time, and
    B = S_r^(-1/2) U_r^T W = S_r^(-3/2) V_r^T L^T (W^T W) (the same projection of W as
    the SVD route, B from W itself)."""
    chol = whitening_factor("lowrank", calib) if config.whiten else None
    gram = grams(weight)
    s2, v = tall_eigh(weight, chol, gram)
    r = config.rank
    if r is None:  # energy: the weight's own spectrum, also when whitened
        own = s2 if chol is None else torch.linalg.eigvalsh(gram).flip(0).clamp_min(0)
        r = energy_rank(own.sqrt().numpy(), config.energy)
    s = s2[:r].sqrt()
    right = v[:, :r] if chol is None else chol @ v[:, :r]  # L V_r
    inv = torch.where(s > 0, 1 / s, torch.zeros_like(s))
    # A in the weight's dtype, filled ROWS rows at a time: no m x r float64 (an 8B head
    # at rank 2,000: 2 GB, and as much again to concatenate the pieces)
    a = torch.empty(weight.shape[0], r, dtype=weight.dtype, device=weight.device)
    root = inv.sqrt()
    for lo in range(0, weight.shape[0], ROWS):
        a[lo : lo + ROWS] = (weight[lo : lo + ROWS].detach().to(torch.float64) @ right) * root
    b = (inv.pow(1.5)[:, None] * right.T) @ gram
    fb, gs = config.factor_bits, config.factor_group_size
    device = weight.device
    return LowRank(
        factors.quantize_factor(a, fb, gs),
        factors.quantize_factor(b.to(device, weight.dtype), fb, gs),
    )


# planning: the settings offered to allocation, their damage, previews' closed forms


def rank_grid(lo: int, hi: int, spectral: bool) -> list[int]:
    """Every rank lo..hi when damages are closed forms (or few), else GRID of them."""
    if hi < lo:
        return []
    if spectral or hi - lo + 1 <= GRID:
        return list(range(lo, hi + 1))
    return sorted({int(round(x)) for x in np.linspace(lo, hi, GRID)})


def grid(m: int, n: int, floor: Floor, spectral: bool = False) -> list[LowRankConfig]:
    """Ranks from the role's floor up to the break-even rank."""
    ranks = rank_grid(floor.min_rank(min(m, n)), break_even_rank(m, n), spectral)
    return [LowRankConfig(rank=r) for r in ranks]


def candidates(mod, dmg, floor: Floor, sigma=None, quick: bool = False) -> list[tuple]:
    """(config, damage) per rank: tail sums of the spectrum (of W L when whitened) where
    damage allows, else one SVD and the error at each rank. `sigma`: W's singular
    values when known."""
    m, n = mod.shape
    closed = dmg.spectral or dmg.calib(mod) is not None  # every rank costs a tail sum
    ranks = [c.rank for c in grid(m, n, floor, closed)]
    if not ranks:
        return []
    if dmg.spectral:
        if sigma is None:
            sigma = torch.linalg.svdvals(mod.weight.double())
        tail = tail_sums(torch.as_tensor(np.asarray(sigma), dtype=torch.float64).pow(2))
        return [(LowRankConfig(rank=r), dmg.relative(mod.name, tail[r], tail[0])) for r in ranks]
    calib = dmg.calib(mod)
    if calib is not None:
        # whitened: ||(W - W_r) X^T||_F^2 = sum_{i>r} s_i^2 of W L (activation-aware
        # spectrum); with output weights, component i costs s_i^2 * sum_j g_j u_ji^2
        g = dmg.out_weights(mod)
        if m <= n:  # U and S^2 of W L from the m x m W H W^T: no factor of H
            s2, u = wide_eigh(mod.weight, calib.hessian)
            p = None if g is None else u * s2.sqrt()
            tail = tail_sums(s2 / s2.sum() if p is None else dmg.whitened_terms(mod, p))
            return [(LowRankConfig(rank=r, whiten=True), tail[r]) for r in ranks]
        chol = whitening_factor("lowrank", calib)
        if m > TALL * n:  # a head or an embedding: n x n Grams, never an m x n float64
            s2, terms = tall_terms(mod.weight, chol, g)
            tail = tail_sums(s2 / s2.sum() if g is None else terms)
            return [(LowRankConfig(rank=r, whiten=True), tail[r]) for r in ranks]
        white = mod.weight.double() @ chol
        if g is None:  # the singular values are enough
            s2 = torch.linalg.svdvals(white).pow(2)
            tail = tail_sums(s2 / s2.sum())
        else:
            u, s, _ = torch.linalg.svd(white, full_matrices=False)
            tail = tail_sums(dmg.whitened_terms(mod, u * s))
        return [(LowRankConfig(rank=r, whiten=True), tail[r]) for r in ranks]
    if m > TALL * n:  # a head: never an m x n error
        gram = grams(mod.weight)
        _, v = tall_eigh(mod.weight, None, gram)
        got = dmg.projected(mod, v, ranks, gram)
        if got is not None:
            return [(LowRankConfig(rank=r), d) for r, d in zip(ranks, got, strict=True)]
    u, s, vh = torch.linalg.svd(mod.weight, full_matrices=False)
    e = mod.weight.clone()
    done, out = 0, []
    for r in ranks:
        e -= (u[:, done:r] * s[done:r]) @ vh[done:r]
        done = r
        out.append((LowRankConfig(rank=r), dmg(mod, e)))
    return out


TALL = 2  # rows per column beyond which whitened candidates go through n x n Grams


def curves(weight, hessian, whiten: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(weight errors, calibration-weighted errors) of low rank at every rank k (index
    k): whitened (below) or plain (plain_curves)."""
    if not whiten:
        return plain_curves(weight, hessian)
    return whitened_curves(weight, hessian)


def plain_curves(weight, hessian) -> tuple[np.ndarray, np.ndarray]:
    """Plain low rank's errors at every rank from W = U S V^T: ||W - W_k||_F^2 =
    sum_{i>k} s_i^2 and, the u_i being orthonormal, ||(W - W_k) X^T||_F^2 =
    sum_{i>k} s_i^2 v_i^T H v_i, through the smaller Gram (wide: u_i^T W H W^T u_i)."""
    w = torch.as_tensor(np.asarray(weight))
    h = torch.as_tensor(np.asarray(hessian))
    if w.shape[0] <= w.shape[1]:
        s2, u = tall_eigh(w.T, None)  # the m x m W W^T
        terms = (wide_gram(w, h) @ u * u).sum(0)
    else:
        s2, v = tall_eigh(w, None)
        terms = s2 * ((h.to(torch.float64) @ v) * v).sum(0)
    return _tails(s2), _tails(terms)


def _tails(t: torch.Tensor, total: torch.Tensor | None = None) -> np.ndarray:
    """sqrt(sum_{i>k} t_i / total) at every k = 0..len(t) (index k; total: sum t)."""
    tail = torch.flip(torch.cumsum(torch.flip(t, (0,)), 0), (0,))
    out = torch.cat([tail, torch.zeros(1, dtype=tail.dtype)]) / (
        t.sum() if total is None else total
    )
    return out.clamp_min(0).sqrt().numpy()


def whitened_curves(weight, hessian) -> tuple[np.ndarray, np.ndarray]:
    """Whitened low rank's errors at every rank, from W L = U S V^T:
    ||(W - W_k) X^T||_F^2 = sum_{i>k} s_i^2 and
    ||W - W_k||_F^2 = sum_{i>k} ||u_i^T W||^2 (= s_i^2 ||v_i^T L^{-1}||^2), by the same
    route as the compressor (wide: W H W^T; else H's factor with the whitening jitter)."""
    w = torch.as_tensor(np.asarray(weight))
    if w.shape[0] <= w.shape[1]:  # from the m x m W H W^T; W - W_k = sum_{i>k} u_i u_i^T W
        s2, u = wide_eigh(w, torch.as_tensor(np.asarray(hessian)))
        wide = w.to(torch.float64)
        rows = ((wide @ wide.T) @ u * u).sum(0)  # ||u_i^T W||^2
    else:
        chol = whitening_factor("lowrank", Calibration(torch.as_tensor(hessian), 0))
        if w.shape[0] > TALL * w.shape[1]:  # a head: from the n x n Gram (tall_terms)
            s2, v = tall_eigh(w, chol)
            vt = v.T
        else:
            _, s, vt = torch.linalg.svd(w.to(torch.float64) @ chol, full_matrices=False)
            s2 = s.pow(2)
        rows = s2 * torch.linalg.solve_triangular(chol, vt, upper=False, left=False).pow(2).sum(1)
    return _tails(rows, w.double().pow(2).sum()), _tails(s2)


def errors(config: LowRankConfig, weight, sigma=None, calib=None, curves=None):
    """Closed-form (weight error, calibration-weighted error or None) of a rank setting:
    from `curves` (with calibration: `curves(W, H, config.whiten)`) or from the
    spectrum (plain, without); None where one compression is needed."""
    if config.rank is None:
        return None
    if curves is not None:
        k = min(config.rank, len(curves[0]) - 1)
        return float(curves[0][k]), float(curves[1][k])
    if not config.whiten and calib is None:
        if sigma is None:
            sigma = torch.linalg.svdvals(torch.as_tensor(weight).double()).numpy()
        curve = rank_error_curve(np.asarray(sigma))
        return float(curve[min(config.rank, len(curve) - 1)]), None
    return None


def half_rank(m: int, n: int) -> int:
    """The rank that stores half of an (m, n) weight's numbers."""
    return max(1, m * n // (2 * (m + n)))


FACTOR_KNOBS = (
    Knob("factor_bits", "bits per factor entry: 2..8, or 16 (unquantized)", 16, "int", 2, 16),
    Knob("factor_group_size", "factor entries sharing a scale and zero point", 64, "int", 1),
)

METHOD = Method(
    name="lowrank",
    config_cls=LowRankConfig,
    compress=compress,
    summary="U (m x r) and V (r x n) of the truncated SVD; optionally whitened by the "
    "calibration Gram",
    paper="Eckart-Young truncated SVD; whitening: SVD-LLM (Wang et al. 2024)",
    data="whiten",
    knobs=(
        Knob("rank", "kept rank r, 1..min(m, n); give this or energy", None, "int", 1),
        Knob(
            "energy",
            "keep the least rank whose share of ||W||_F^2 reaches this, in (0, 1]",
            None,
            "float",
            0.0,
            1.0,
            overrides=("rank",),
        ),
        Knob("whiten", "activation-aware truncation (needs calibration)", False, "bool"),
        *FACTOR_KNOBS,
    ),
    flags=("whiten",),
    columns=("rank", "energy"),
    defaults=lambda m, n: {"rank": half_rank(m, n)},
    grid=grid,
    candidates=candidates,
    spectral=True,
    errors=errors,
    curves=curves,
    factorizations=(LowRank,),
    mixed=True,
    probes={"lowrank-half": lambda m, n: LowRankConfig(rank=max(1, m * n // (2 * (m + n))))},
    exports={"compressed-tensors": "low-rank factors: no compressed-tensors format"},
)
