"""Matrix product operator (tensor-train) layers (CompactifAI, Tomut et al. 2024).

W (m, n) with m = m_1..m_K, n = n_1..n_K is reshaped so that core k carries the
paired index (i_k, j_k), and decomposed by TT-SVD (Oseledets 2011) with every bond
truncated to at most `bond_dim`. CompactifAI then heals the model by brief
retraining (spectra heal) and stores the cores in int4 (`factor_bits: 4`,
compressors.factors). The forward
contracts the input with one core at a time and never forms W.

Calibrated (`whiten: true`), objective ||(W - W_hat) X^T||_F^2 = tr(E H E^T), in two
steps:
1. input scaling: a dense whitening L^{-1} cannot be stored beside the cores, but a
   diagonal one can. W_hat = M diag(g) with M = TT-SVD(W diag(d)) and g = 1/d,
   d_j = ||X_j||^alpha (activation column norms, as AWQ and Wanda weight inputs), so
   input channels that carry more energy are truncated less; alpha is chosen from
   ALPHAS by the calibration-weighted error (0 is the plain TT-SVD). g costs n
   parameters, counted in `cost`; the forward scales x by g before the cores.
2. `sweeps` H-weighted alternating least-squares sweeps over the cores (the
   orthogonality centre moved along, as in DMRG-style ALS): the error is quadratic
   in one core with the others fixed, and CG_STEPS conjugate-gradient steps on that
   core's normal equations A*(A(G) H') = A*(W' H') (A: core -> dense matrix, H' =
   diag(g) H diag(g), W' = W diag(1/g)) lower it monotonically. A core holds far too
   many unknowns for a direct solve (r m_k n_k r'), but each CG step costs one dense
   reconstruction, its adjoint and one (m, n) x (n, n) product.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from torch import nn

from compressors import factors
from compressors.base import DENSE_BITS, Calibration, Factorization, config_error, h_norm
from compressors.lowrank import FACTOR_KNOBS
from compressors.method import Floor, Knob, Method
from compressors.mpo_fit import dense, refine
from spectra.linalg import mpo

ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)  # exponents of the input scaling tried when calibrated
GRID_CORES = 3  # allocation offers this many cores x GRID_BONDS bond dimensions
GRID_BONDS = 12


@dataclass(frozen=True)
class MPOConfig:
    """Settings of `mpo`.

    Attributes:
        cores: number of MPO cores K (2..6); m and n are factored as spectra.linalg.mpo.factorize.
        bond_dim: maximum bond dimension chi (>= 1).
        whiten: calibrated form: input scaling and H-weighted sweeps (needs calibration).
        sweeps: H-weighted ALS sweeps over the cores of the calibrated form (>= 0).
        factor_bits: bits per core entry, 2..8, or 16 (unquantized): CompactifAI's
            "MPO + int4" at 4.
        factor_group_size: entries sharing a scale and zero point along a core's
            (r m_k, n_k r') rows.
    """

    method: ClassVar[str] = "mpo"
    cores: int = 3
    bond_dim: int = 32
    whiten: bool = False
    sweeps: int = 2
    factor_bits: int = 16
    factor_group_size: int = 64

    def __post_init__(self):
        if not isinstance(self.cores, int) or not mpo.MIN_CORES <= self.cores <= mpo.MAX_CORES:
            raise config_error(
                self.method, "cores", self.cores, f"must be in {mpo.MIN_CORES}..{mpo.MAX_CORES}"
            )
        if not isinstance(self.bond_dim, int) or self.bond_dim < 1:
            raise config_error(self.method, "bond_dim", self.bond_dim, "must be an integer >= 1")
        if not isinstance(self.sweeps, int) or isinstance(self.sweeps, bool) or self.sweeps < 0:
            raise config_error(self.method, "sweeps", self.sweeps, "must be an integer >= 0")
        factors.check(self.method, self.factor_bits, self.factor_group_size)

    def check_shape(self, m: int, n: int) -> None:
        pass  # any bond_dim is valid: bonds are capped at their full dimension

    def cost(self, m: int, n: int) -> tuple[int, int]:
        mf, nf = mpo.factorize(m, self.cores), mpo.factorize(n, self.cores)
        p = mpo.params_at_chi(mf, nf, self.bond_dim) + (n if self.whiten else 0)
        if self.factor_bits == 16:
            return p, DENSE_BITS * p
        ranks = [1, *(min(self.bond_dim, d) for d in mpo.full_bond_dims(mf, nf)), 1]
        shapes = [(ranks[k], mf[k], nf[k], ranks[k + 1]) for k in range(self.cores)]
        bits = sum(factors.factor_cost(s, self.factor_bits, self.factor_group_size) for s in shapes)
        return p, bits + (DENSE_BITS * n if self.whiten else 0)


@dataclass
class MPO(factors.QuantizedFactors, Factorization):
    cores: list  # (r_{k-1}, m_k, n_k, r_k), tensors or QuantizedFactors
    scale: torch.Tensor | None = None  # (n,) input scaling g: W_hat = M diag(g)

    @property
    def shape(self):
        return (
            math.prod(c.shape[1] for c in self.cores),
            math.prod(c.shape[2] for c in self.cores),
        )

    def to_dense(self):
        cores = [factors.dense(c) for c in self.cores]
        w = mpo.tt_to_dense([c.detach().double() for c in cores])
        if self.scale is not None:
            w = w * self.scale.double()[None, :]
        return w.to(cores[0].dtype)

    @property
    def n_params(self):
        return sum(c.numel() for c in self.cores) + (
            0 if self.scale is None else self.scale.numel()
        )

    @property
    def bits(self):
        scale = 0 if self.scale is None else DENSE_BITS * self.scale.numel()
        return sum(factors.bits_of(c) for c in self.cores) + scale

    def as_module(self, bias=None):
        return MPOLinear(self.cores, bias, self.scale)


class MPOLinear(nn.Module):
    """y = W x + b with W held as MPO cores, contracted one core at a time.

    The contraction runs from the first core or from the last, whichever needs fewer
    multiplications per token for these bond dimensions (up to 1.75x apart on the
    demo's 576 x 1536 shapes); from the last, the input's column factors and the
    output's row factors are taken in reverse order and the cores with their bonds
    swapped, which is the same product.
    """

    def __init__(self, cores, bias=None, scale=None):
        super().__init__()
        self.quantized = isinstance(cores[0], factors.QuantizedFactor)
        if self.quantized:  # codes per core, dequantized in the forward
            self.qcores = nn.ModuleList([factors.FactorModule(c) for c in cores])
        else:
            self.cores = nn.ParameterList([nn.Parameter(c, requires_grad=False) for c in cores])
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.scale = None if scale is None else nn.Parameter(scale, requires_grad=False)
        self.mf = [c.shape[1] for c in cores]
        self.nf = [c.shape[2] for c in cores]
        self.reverse = contraction_cost(cores, reverse=True) < contraction_cost(cores)
        for i, c in enumerate(reversed(cores) if self.reverse and not self.quantized else ()):
            self.register_buffer(f"_rev{i}", c.permute(3, 1, 2, 0).contiguous(), persistent=False)

    def core_list(self, dtype=None) -> list[torch.Tensor]:
        """The float cores (dequantized when stored as codes)."""
        if self.quantized:
            return [c().to(dtype) for c in self.qcores]
        return list(self.cores)

    def forward(self, x):
        lead, k = x.shape[:-1], len(self.mf)
        if self.scale is not None:
            x = x * self.scale
        cores = self.core_list(x.dtype)
        if any(p.requires_grad for p in self.parameters()):
            # healing's training form (also when it evaluates under no_grad, and when the
            # cores are parametrized: the reversed copies below would be stale): on
            # batches of thousands of tokens, forming W costs less than the contraction
            return nn.functional.linear(x, dense(cores), self.bias)
        if not self.reverse:
            y = _contract(x.reshape(-1, x.shape[-1]), cores)
        else:
            flip = [0, *range(k, 0, -1)]
            xr = x.reshape(-1, *self.nf).permute(*flip).reshape(-1, x.shape[-1])
            if self.quantized:
                rev = [c.permute(3, 1, 2, 0) for c in reversed(cores)]
            else:
                rev = [getattr(self, f"_rev{i}") for i in range(k)]
            y = _contract(xr, rev).reshape(-1, *self.mf[::-1]).permute(*flip)
        y = y.reshape(*lead, -1)
        return y if self.bias is None else y + self.bias


def _contract(x, cores):
    """(B, n) -> (B, m) through cores (r_{k-1}, m_k, n_k, r_k), first core first."""
    state = x.reshape(x.shape[0], 1, 1, x.shape[-1])  # (B, rows done, bond, columns left)
    for core in cores:
        b, done, r, left = state.shape
        _, mk, nk, r2 = core.shape
        state = state.reshape(b, done, r, nk, left // nk)
        state = torch.einsum("bdrnz,rmns->bdmsz", state, core)
        state = state.reshape(b, done * mk, r2, left // nk)
    return state.reshape(x.shape[0], -1)


def contraction_cost(cores, reverse: bool = False) -> int:
    """Multiplications per input row of the one-core-at-a-time contraction."""
    shapes = [tuple(c.shape) for c in cores]
    if reverse:
        shapes = [(s[3], s[1], s[2], s[0]) for s in reversed(shapes)]
    done, left = 1, math.prod(s[2] for s in shapes)
    total = 0
    for r, mk, nk, r2 in shapes:
        total += done * r * left * mk * r2
        done, left = done * mk, left // nk
    return total


def compress(weight: torch.Tensor, config: MPOConfig, calib: Calibration | None = None) -> MPO:
    """TT-SVD of `weight` into `cores` cores, bonds capped at `bond_dim` (see the module
    doc for the calibrated form)."""
    m, n = weight.shape
    mf, nf = mpo.factorize(m, config.cores), mpo.factorize(n, config.cores)
    w = weight.detach().to(torch.float64)

    def tt_svd(x: torch.Tensor) -> list[torch.Tensor]:  # in torch, on the weight's device
        return mpo.tt_svd(x, mf, nf, ranks=config.bond_dim)

    if not config.whiten:
        return _stored([c.to(weight.dtype) for c in tt_svd(w)], None, config)
    if calib is None:
        raise config_error("mpo", "whiten", True, "needs calibration data")
    h = calib.hessian.to(torch.float64)
    norms = calib.col_norms.to(torch.float64)
    norms = (
        norms / norms[norms > 0].mean()
        if bool((norms > 0).any())
        else torch.ones(n, dtype=torch.float64, device=norms.device)
    )
    norms = norms.clamp_min(1e-6)  # dead inputs: scaled down, never divided by zero
    best = None
    for alpha in ALPHAS:
        d = norms.pow(alpha)
        cores = tt_svd(w * d[None, :])
        f = MPO(cores, 1 / d)
        err = h_norm(w - f.to_dense(), h)
        if best is None or err < best[0]:
            best = (err, f)
    f = best[1]
    cores = f.cores
    if config.sweeps:
        g = f.scale
        cores = refine(cores, w / g[None, :], g[:, None] * h * g[None, :], config.sweeps)
    return _stored([c.to(weight.dtype) for c in cores], f.scale.to(weight.dtype), config)


def _stored(cores, scale, config: MPOConfig) -> MPO:
    """The MPO as stored: cores quantized at `factor_bits` (16: as they are)."""
    fb, gs = config.factor_bits, config.factor_group_size
    return MPO([factors.quantize_factor(c, fb, gs) for c in cores], scale)


# planning: bond dimensions on a geometric grid, damage by the TT-SVD bound


def grid(m: int, n: int, floor: Floor, spectral: bool = False) -> list[MPOConfig]:
    mf, nf = mpo.factorize(m, GRID_CORES), mpo.factorize(n, GRID_CORES)
    top = max(mpo.full_bond_dims(mf, nf))
    chis = sorted({int(round(x)) for x in np.geomspace(2, top, GRID_BONDS)})
    configs = [MPOConfig(cores=GRID_CORES, bond_dim=chi) for chi in chis]
    return [c for c in configs if c.cost(m, n)[0] < m * n]


def candidates(mod, dmg, floor: Floor, sigma=None, quick: bool = False) -> list[tuple]:
    """(config, damage): the TT-SVD bound (sum of squared bond tails, exact for one bond)
    under weight damage, of W D (D = diag(H)^(1/2)) when calibrated, else one
    compression per setting."""
    m, n = mod.shape
    mf, nf = mpo.factorize(m, GRID_CORES), mpo.factorize(n, GRID_CORES)
    w = mod.weight.double().numpy()
    calib = dmg.calib(mod)
    if calib is not None:
        return _calibrated_candidates(mod, dmg, floor, calib, mf, nf)
    spectra = mpo.bond_spectra(w, mf, nf) if dmg.spectral else None
    out = []
    for config in grid(m, n, floor):
        if dmg.spectral:
            err2 = sum(float(np.sum(s[config.bond_dim :] ** 2)) for s in spectra)
            d = dmg.relative(mod.name, err2, float(np.sum(w * w)))
        else:
            d = dmg(mod, mod.weight - compress(mod.weight, config).to_dense().to(mod.weight.dtype))
        out.append((config, d))
    return out


def _calibrated_candidates(mod, dmg, floor: Floor, calib, mf, nf) -> list[tuple]:
    """Calibrated mpo, damage by the TT-SVD bound of W D with D = diag(H)^(1/2)."""
    m, n = mod.shape
    d = calib.col_norms.double().clamp_min(1e-12)
    wd = (mod.weight.double() * d[None, :]).numpy()
    spectra = mpo.bond_spectra(wd, mf, nf)
    total = float(np.sum(wd * wd))
    out = []
    for config in grid(m, n, floor):
        config = MPOConfig(cores=config.cores, bond_dim=config.bond_dim, whiten=True)
        if config.cost(m, n)[0] >= m * n:
            continue
        err2 = sum(float(np.sum(s[config.bond_dim :] ** 2)) for s in spectra)
        out.append((config, dmg.calib_relative(mod, err2, total)))
    return out


METHOD = Method(
    name="mpo",
    config_cls=MPOConfig,
    compress=compress,
    summary="K MPO (tensor-train) cores with bonds capped at bond_dim, by TT-SVD; the "
    "forward contracts the cores with the input",
    paper="CompactifAI (Tomut et al. 2024)",
    data="whiten",
    knobs=(
        Knob("cores", "number of MPO cores K", 3, "int", mpo.MIN_CORES, mpo.MAX_CORES),
        Knob("bond_dim", "maximum bond dimension chi", 32, "int", 1),
        Knob("whiten", "input scaling and H-weighted sweeps (needs calibration)", False, "bool"),
        Knob("sweeps", "H-weighted ALS sweeps of the calibrated form", 2, "int", 0),
        *FACTOR_KNOBS,
    ),
    flags=("whiten",),
    columns=("cores", "bond_dim"),
    grid=grid,
    candidates=candidates,
    factorizations=(MPO,),
    exports={"compressed-tensors": "MPO cores: no compressed-tensors format"},
)
