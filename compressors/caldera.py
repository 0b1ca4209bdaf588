"""CALDERA: W ~ Q + L R, a low-precision backbone plus low-rank, low-precision factors
(Saha et al. 2024, "Compressing Large Language Models using Low Rank and Low Precision
Decomposition").

Objective: the calibration-weighted error ||(Q + L R - W) X^T||_F^2 = tr(E H E^T),
H = X^T X. Steps, as in the paper's Algorithms 1 and 2:
- per-matrix scaling (W / rms(W), one 16-bit scalar) and incoherence processing:
  W' = U W V^T, H' = V H V^T with seeded random orthogonal U, V (Hadamard kron a small
  Haar-random factor, random signs; see compressors.rotation), which leave the
  objective unchanged and spread outliers so scalar grids fit;
- `iters` outer iterations: Q = LDLQ(W' - L R) at `bits` under H' (group-wise grid,
  compressors.gptq.ldlq), then (L, R) = LPLR(W' - Q): the closed-form H-weighted
  rank-r fit trunc_r(A C) C^{-1} (H' = C C^T), refined `lplr_iters` times by
  quantizing R with LDLQ under H', refitting L in closed form and quantizing it with
  LDLQ under R H' R^T, then refitting R; factors at `factor_bits` (16 = unquantized);
- the iterate with the smallest H-weighted error is kept (the paper's "track best").
Open choices made here: rotations are structured (not dense Haar) so they cost no
storage; H is damped by 1% of its mean diagonal inside LDLQ (GPTQ's default).
Storage: Q and the factors count their codes plus a 16-bit scale and zero point per
group; the rotation seed 64 bits; the matrix scale 16 bits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from compressors import e8p, rotation
from compressors.base import (
    DENSE_BITS,
    Calibration,
    Factorization,
    check_rank,
    config_error,
    h_norm,
    require_int,
)
from compressors.factors import Plain  # also compressors.caldera.Plain, as older OUTs name it
from compressors.gptq import ldlq
from compressors.method import Floor, Knob, Method, residuals
from compressors.quant import (
    QUANTIZERS,
    QuantConfig,
    Quantized,
    check_e8p_shape,
    check_quantizer,
    hessian_inverse_factor,
    round_to_nearest,
)
from compressors.quant import compress as quantize_rtn
from compressors.rotation import Rotation

FACTOR_BITS = (2, 3, 4, 5, 6, 7, 8, 16)
SEED_BITS = 64
GRID_BITS = (2, 3, 4)  # backbone bits x ranks offered to allocation
GRID_RANKS = (16, 32, 64)


@dataclass(frozen=True)
class CalderaConfig:
    """Settings of `caldera`.

    Attributes:
        rank: rank r of L R (1..min(m, n)).
        bits: bits per entry of the backbone Q, 2..8.
        factor_bits: bits per entry of L and R, 2..8, or 16 for unquantized factors.
        group_size: columns sharing one scale and zero point in every quantizer.
        iters: outer iterations (Q update, then L R update).
        lplr_iters: quantized refinement steps of L and R inside each outer iteration.
        incoherence: apply the seeded random rotations.
        seed: seed of the rotations.
        quantizer: Q's codebook: "scalar" (group-wise grid, LDLQ) or "e8p" (QuIP#'s
            2-bit E8 lattice codebook, block LDLQ over 8 columns; compressors.e8p), as
            the paper's headline results use.
    """

    method: ClassVar[str] = "caldera"
    rank: int = 32
    bits: int = 2
    factor_bits: int = 4
    group_size: int = 64
    iters: int = 20
    lplr_iters: int = 1
    incoherence: bool = True
    seed: int = 0
    quantizer: str = "scalar"

    def __post_init__(self):
        require_int(self.method, "rank", self.rank, 1)
        if not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise config_error(self.method, "bits", self.bits, "must be an integer in 2..8")
        if self.factor_bits not in FACTOR_BITS:
            raise config_error(self.method, "factor_bits", self.factor_bits, "must be 2..8 or 16")
        require_int(self.method, "group_size", self.group_size, 1)
        require_int(self.method, "iters", self.iters, 1)
        require_int(self.method, "lplr_iters", self.lplr_iters, 0)
        check_quantizer(self.method, self.quantizer, self.bits)

    def check_shape(self, m: int, n: int) -> None:
        check_rank(self.method, self.rank, m, n)
        check_e8p_shape(self.method, self.quantizer, n)

    def cost(self, m: int, n: int) -> tuple[int, int]:
        r, gs, fb = self.rank, self.group_size, self.factor_bits
        if self.quantizer == "e8p":
            q = e8p.e8p_cost(m, n)
        else:
            q = self.bits * m * n + 2 * DENSE_BITS * m * math.ceil(n / gs)
        if fb == 16:
            factors = DENSE_BITS * r * (m + n)
        else:
            factors = (
                fb * r * (m + n)
                + 2 * DENSE_BITS * m * math.ceil(r / min(gs, r))
                + 2 * DENSE_BITS * r * math.ceil(n / gs)
            )
        seed = SEED_BITS if self.incoherence else 0
        return m * n + r * (m + n), q + factors + DENSE_BITS + seed


@dataclass
class Caldera(Factorization):
    q: Quantized | e8p.E8PQuantized  # (m, n), rotated and scaled coordinates
    l: Quantized | Plain  # (m, r)
    r: Quantized | Plain  # (r, n)
    scale: float
    seed: int | None  # None: no rotation
    h_error: float  # relative calibration-weighted error of the kept iterate

    @property
    def shape(self):
        return self.q.shape

    def rotations(self):
        return rotation.pair(*self.shape, self.seed)

    def to_dense(self):
        w = (self.q.to_dense() + self.l.to_dense() @ self.r.to_dense()).to(torch.float64)
        if self.seed is not None:
            w = rotation.unrotate(w, self.rotations())  # U^T W' V
        return (self.scale * w).to(self.q.scales.dtype)

    @property
    def rank(self) -> int:
        return self.l.to_dense().shape[1]

    @property
    def n_params(self):
        m, n = self.shape
        return m * n + self.rank * (m + n)

    @property
    def bits(self):
        seed = SEED_BITS if self.seed is not None else 0
        return self.q.bits + self.l.bits + self.r.bits + DENSE_BITS + seed

    def as_module(self, bias=None):
        return CalderaLinear(self, bias)

    healable: ClassVar[bool] = True  # L and R train (in float, requantized after), not Q

    def float_factors(self) -> dict:
        old = {(n, None): getattr(self, n) for n in "lr" if isinstance(getattr(self, n), Quantized)}
        for (n, _), q in old.items():
            setattr(self, n, Plain(q.to_dense().to(q.scales.dtype).contiguous()))
        return old

    def trained(self, key: tuple) -> torch.Tensor:
        return getattr(self, key[0]).value

    def on_grid(self, value, old):  # L's or R's grid: same bits, groups and symmetry
        return round_to_nearest(
            value.to(old.scales.dtype), old.nbits, old.group_size, old.symmetric
        )


class CalderaLinear(nn.Module):
    """y = s U^T (Q + L R) V x + b, with Q, L, R dequantized in the forward, W never stored.

    Unquantized factors (factor_bits 16) are parameters `l`, `r` sharing the
    factorization's tensors, so healing trains them in place; Q is always frozen."""

    def __init__(self, f: Caldera, bias=None):
        super().__init__()
        self.f = f
        self.rot = f.rotations() if f.seed is not None else None
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        for side in ("l", "r"):
            part = getattr(f, side)
            if isinstance(part, Plain):
                setattr(self, side, nn.Parameter(part.value, requires_grad=False))

    def _factor(self, side: str, dtype):
        part = getattr(self.f, side)
        return (getattr(self, side) if isinstance(part, Plain) else part.to_dense()).to(dtype)

    def forward(self, x):
        dtype = x.dtype
        if self.rot is not None:
            x = self.rot[1].apply(x.to(torch.float64)).to(dtype)  # x V^T
        y = nn.functional.linear(x, self.f.q.to_dense().to(dtype))
        y = y + nn.functional.linear(
            nn.functional.linear(x, self._factor("r", dtype)), self._factor("l", dtype)
        )
        if self.rot is not None:
            y = self.rot[0].apply_inverse(y.to(torch.float64)).to(dtype)  # (.) U
        y = y * self.f.scale
        return y if self.bias is None else y + self.bias


def compress(weight: torch.Tensor, config: CalderaConfig, calib: Calibration | None = None):
    """Q + L R minimizing the calibration-weighted error (needs calibration data)."""
    m, n = weight.shape
    config.check_shape(m, n)
    if calib is None:
        raise config_error("caldera", "calibration", None, "caldera needs calibration data")
    w = weight.detach().to(torch.float64)
    scale = float(w.pow(2).mean().sqrt()) or 1.0
    w = w / scale
    h = calib.hessian.to(torch.float64)
    h = h / torch.diagonal(h).mean().clamp_min(1e-30)
    if config.incoherence:
        u, v = Rotation(m, config.seed), Rotation(n, config.seed + 1)
        w = u.apply(v.apply(w).T).T  # U W V^T
        h = v.apply(v.apply(h).T)  # V H V^T
    chol = _cholesky(h)
    factor = hessian_inverse_factor(h)  # shared by every LDLQ call under H'
    norm = h_norm(w, h)
    lr = torch.zeros_like(w)
    best = None
    for _ in range(config.iters):
        if config.quantizer == "e8p":
            q = e8p.E8PQuantized(*e8p.ldlq(w - lr, h, factor))
        else:
            q = _quantize(w - lr, h, config.bits, config.group_size, factor)
        lq, rq, err2 = _lplr(w - q.to_dense(), h, chol, factor, config)
        lr = lq.to_dense() @ rq.to_dense()
        err = max(err2, 0.0) ** 0.5 / norm  # ||(W' - Q - L R) C||_F, from LPLR
        if best is None or err < best[0]:
            best = (err, q, lq, rq)
    err, q, lq, rq = best
    dtype = weight.dtype
    return Caldera(
        _cast(q, dtype),
        _cast(lq, dtype),
        _cast(rq, dtype),
        scale,
        config.seed if config.incoherence else None,
        err,
    )


def _quantize(a, h, bits, group_size, factor=None) -> Quantized:
    codes, s, z = ldlq(a, h, bits, group_size, factor=factor)
    return Quantized(codes, s, z, bits, group_size)


def _lplr(a, h, chol, factor, config):
    """Quantized H-weighted rank-r factorization of a (Algorithm 2, LPLRFactorize).

    Errors of candidates are evaluated without an (m, n, n) product each time:
    ||(A - L R) C||^2 = ||A C||^2 - 2 <L, A H R^T> + ||L (R C)||^2, with A H and
    ||A C||^2 = <A, A H> computed once; A C itself is never formed.
    """
    r = config.rank
    ah = a @ h
    a_norm2 = float((a * ah).sum())
    u, s, v = _top_svd(a, chol, r, config.seed)
    root = s[:r].sqrt()
    left = u[:, :r] * root
    right = torch.linalg.solve_triangular(chol, root[:, None] * v[:, :r].T, upper=False, left=False)
    if config.factor_bits == 16:
        lrc = left @ (right @ chol)
        err2 = a_norm2 - 2 * float((left * (ah @ right.T)).sum()) + float((lrc * lrc).sum())
        return Plain(left), Plain(right), err2
    best = None
    gs = config.group_size
    for _ in range(max(1, config.lplr_iters)):
        rq = _quantize(right, h, config.factor_bits, gs, factor)
        rd = rq.to_dense()
        h_l = rd @ h @ rd.T  # the Hessian that L's error sees
        left = torch.linalg.lstsq(h_l, (ah @ rd.T).T).solution.T
        lq = _quantize(left, h_l, config.factor_bits, min(gs, r))
        ld = lq.to_dense()
        lrc = ld @ (rd @ chol)
        err2 = a_norm2 - 2 * float((ld * (ah @ rd.T)).sum()) + float((lrc * lrc).sum())
        if best is None or err2 < best[0]:
            best = (err2, lq, rq)
        right = torch.linalg.lstsq(ld, a).solution  # H cancels in the R-step
    return best[1], best[2], best[0]


def _top_svd(a, c, r, seed, oversample=10, niter=4):
    """Top-r singular triplets (U, s, V) of A C by a seeded randomized range finder, as
    LPLR (Saha et al. 2023) uses. A C is only applied to thin blocks, never formed; the
    generator is local, so concurrent calls stay reproducible."""
    g = torch.Generator().manual_seed(seed)
    k = min(r + oversample, min(a.shape))
    omega = torch.randn(a.shape[1], k, generator=g, dtype=a.dtype).to(a.device)  # CPU draws
    q = torch.linalg.qr(a @ (c @ omega)).Q
    for _ in range(niter):  # power iterations, re-orthonormalized each half step
        p = torch.linalg.qr(c.T @ (a.T @ q)).Q
        q = torch.linalg.qr(a @ (c @ p)).Q
    u, s, vh = torch.linalg.svd((q.T @ a) @ c, full_matrices=False)
    return q @ u, s, vh.T


def _cholesky(h):
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    for jitter in (0.0, 1e-8, 1e-6, 1e-4, 1e-2):
        chol, info = torch.linalg.cholesky_ex(h + jitter * eye)
        if int(info) == 0:
            return chol
    raise config_error("caldera", "calibration", None, "calibration Gram is not positive definite")


def _cast(f, dtype):
    if isinstance(f, Plain):
        return Plain(f.value.to(dtype))
    if isinstance(f, e8p.E8PQuantized):
        return e8p.E8PQuantized(f.codes, f.scales.to(dtype))
    return Quantized(
        f.codes.to(torch.uint8), f.scales.to(dtype), f.zeros.to(dtype), f.nbits, f.group_size
    )


# planning: backbone bits x ranks, damage by a data-free proxy


def grid(m: int, n: int, floor: Floor, spectral: bool = False) -> list[CalderaConfig]:
    lo = floor.min_rank(min(m, n))
    configs = [
        CalderaConfig(rank=r, bits=b)
        for r in GRID_RANKS
        if lo <= r <= min(m, n)
        for b in GRID_BITS
        if b >= floor.bits
    ]
    return [c for c in configs if c.cost(m, n)[1] < DENSE_BITS * m * n]


def candidates(mod, dmg, floor: Floor, sigma=None, quick: bool = False) -> list[tuple]:
    """(config, damage) with the damage of W_r + RTN(W - W_r) at the same bits: a proxy
    that orders the settings (the real CALDERA error is smaller)."""
    m, n = mod.shape
    residual = residuals(mod.weight)
    out = []
    for config in grid(m, n, floor):
        rtn = QuantConfig(bits=config.bits, group_size=config.group_size)
        r = residual(config.rank)
        out.append((config, dmg(mod, r - quantize_rtn(r, rtn).to_dense().to(r.dtype))))
    return out


METHOD = Method(
    name="caldera",
    config_cls=CalderaConfig,
    compress=compress,
    summary="Q + L R: a 2..8-bit backbone Q and rank-r factors L, R quantized to "
    "factor_bits, fitted to the calibration-weighted error",
    paper="CALDERA (Saha et al. 2024)",
    data="required",
    knobs=(
        Knob("rank", "rank r of L R, 1..min(m, n)", 32, "int", 1),
        Knob("bits", "bits per entry of the backbone Q", 2, "int", 2, 8),
        Knob(
            "factor_bits", "bits per entry of L and R: 2..8, or 16 (unquantized)", 4, "int", 2, 16
        ),
        Knob("group_size", "columns sharing one scale and zero point", 64, "int", 1),
        Knob("iters", "outer iterations (Q update, then L R update)", 20, "int", 1),
        Knob("lplr_iters", "quantized refinement steps of L and R per iteration", 1, "int", 0),
        Knob("incoherence", "apply the seeded random rotations", True, "bool"),
        Knob("seed", "seed of the rotations", 0, "int", 0),
        Knob(
            "quantizer",
            "Q's codebook: scalar (group-wise grid) or e8p (2-bit E8 lattice)",
            "scalar",
            "choice",
            choices=QUANTIZERS,
        ),
    ),
    columns=("rank", "bits", "factor_bits"),
    defaults=lambda m, n: {"rank": min(32, m, n)},
    grid=grid,
    candidates=candidates,
    factorizations=(Caldera,),
    exports={"compressed-tensors": "Q + LR: no compressed-tensors format"},
)
