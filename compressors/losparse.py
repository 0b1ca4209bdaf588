"""Low-rank plus sparse: W ~ U V + S (LoSparse, Li et al. 2023, post-training form).

LoSparse initialises the low-rank part by the truncated SVD of W and keeps the
residual W - U V as a sparse matrix pruned by magnitude; the paper then fine-tunes
with iterative pruning, which a data-free post-training tool cannot do. What is
kept: SVD init, then S = the largest-|.| entries of the residual at `sparsity`
(fraction of zeros), either unstructured or whole rows (`structured: rows`, rows
ranked by residual norm). With `iters` > 0 the two parts are refined by alternating
projections (U V = trunc_r(W - S), S = top-k(W - U V)), as in GoDec-style robust
PCA; the iterate with the smallest error is kept.

Whitened (`whiten: true`), objective ||(W - U V - S) X^T||_F with H = X^T X = L L^T:
U V = trunc_r((W - S) L) L^{-1}, the best rank r under that norm (SVD-LLM), and the
residual's entries kept by their calibration-weighted size |E_ij| ||X_j|| (Wanda's
score), or whole rows by their weighted norm ||E_i L||; the alternation and the
choice of the best iterate use the weighted error.
`factor_bits` < 16 stores U and V as group-wise codes (compressors.factors), chosen
after the alternation; the sparse values stay 16-bit.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from compressors import factors
from compressors.base import (
    DENSE_BITS,
    Calibration,
    Factorization,
    check_rank,
    config_error,
    csr_index_bits,
    h_norm,
    require_int,
    whitening_factor,
)
from compressors.lowrank import FACTOR_KNOBS, LowRankLinear, half_rank
from compressors.method import Floor, Knob, Method, break_even_rank, residuals
from compressors.sparse import CSR, SparseLinear, TrainableSparseLinear, top_k_mask

STRUCTURES = ("none", "rows")
RANK_FRACTIONS = (1 / 16, 1 / 8, 1 / 4, 1 / 2)  # of the break-even rank, for allocation
SPARSITIES = (0.9, 0.95, 0.98, 0.99)


@dataclass(frozen=True)
class LoSparseConfig:
    """Settings of `losparse`.

    Attributes:
        rank: rank r of U V (1..min(m, n)).
        sparsity: fraction of the residual's entries (or rows) set to zero, in [0, 1).
        structured: `none` (unstructured top-|S|) or `rows` (whole rows of S).
        iters: alternating refinement steps after the SVD init (0 = LoSparse's init).
        whiten: activation-aware low-rank part and residual scores (needs calibration).
        factor_bits: bits per entry of U and V, 2..8, or 16 (unquantized).
        factor_group_size: entries sharing a scale and zero point along a factor's rows.
    """

    method: ClassVar[str] = "losparse"
    rank: int = 8
    sparsity: float = 0.95
    structured: str = "none"
    iters: int = 0
    whiten: bool = False
    factor_bits: int = 16
    factor_group_size: int = 64

    def __post_init__(self):
        require_int(self.method, "rank", self.rank, 1)
        factors.check(self.method, self.factor_bits, self.factor_group_size)
        if not 0 <= self.sparsity < 1:
            raise config_error(self.method, "sparsity", self.sparsity, "must be in [0, 1)")
        if self.structured not in STRUCTURES:
            raise config_error(self.method, "structured", self.structured, f"one of {STRUCTURES}")
        require_int(self.method, "iters", self.iters, 0)

    def check_shape(self, m: int, n: int) -> None:
        check_rank(self.method, self.rank, m, n)

    def cost(self, m: int, n: int) -> tuple[int, int]:
        r, fb, gs = self.rank, self.factor_bits, self.factor_group_size
        lr = r * (m + n)
        lr_bits = factors.factor_cost((m, r), fb, gs) + factors.factor_cost((r, n), fb, gs)
        if self.structured == "rows":
            k = round((1 - self.sparsity) * m)
            return lr + k * n, lr_bits + DENSE_BITS * k * n + 32 * k
        nnz = round((1 - self.sparsity) * m * n)
        return lr + nnz, lr_bits + DENSE_BITS * nnz + csr_index_bits(m, n, nnz)


@dataclass
class LowRankSparse(factors.QuantizedFactors, Factorization):
    a: torch.Tensor | factors.QuantizedFactor  # (m, r)
    b: torch.Tensor | factors.QuantizedFactor  # (r, n)
    s: CSR  # unstructured residual
    rows: torch.Tensor | None = None  # row indices when the residual keeps whole rows
    row_values: torch.Tensor | None = None  # (k, n)

    @property
    def shape(self):
        return (self.a.shape[0], self.b.shape[1])

    def sparse_dense(self) -> torch.Tensor:
        if self.rows is None:
            return self.s.to_dense()
        out = self.row_values.new_zeros(self.shape)
        out[self.rows] = self.row_values
        return out

    def to_dense(self):
        return factors.dense(self.a) @ factors.dense(self.b) + self.sparse_dense()

    @property
    def n_params(self):
        lr = self.a.shape[1] * sum(self.shape)
        return lr + (self.s.nnz if self.rows is None else self.row_values.numel())

    @property
    def bits(self):
        lr = factors.bits_of(self.a) + factors.bits_of(self.b)
        if self.rows is None:
            return lr + self.s.bits
        return lr + DENSE_BITS * self.row_values.numel() + 32 * self.rows.numel()

    def as_module(self, bias=None):
        return LowRankSparseLinear(self, bias)

    def train(self, module: nn.Module) -> None:
        """The factors train, and the sparse values on their fixed support."""
        module.low.requires_grad_(True)
        if module.sparse is not None:
            module.sparse = TrainableSparseLinear(self.s)
        else:
            values = module.row_values
            del module.row_values
            module.row_values = nn.Parameter(values)


class LowRankSparseLinear(nn.Module):
    def __init__(self, f: LowRankSparse, bias):
        super().__init__()
        self.low = LowRankLinear(f.a, f.b)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        if f.rows is None:
            self.sparse = SparseLinear(f.s, None)
        else:
            self.sparse = None
            self.register_buffer("rows", f.rows)
            self.register_buffer("row_values", f.row_values)

    def forward(self, x):
        y = self.low(x)
        if self.sparse is not None:
            y = y + self.sparse(x)
        else:
            y = y.index_add(-1, self.rows, nn.functional.linear(x, self.row_values))
        return y if self.bias is None else y + self.bias


def compress(weight: torch.Tensor, config: LoSparseConfig, calib: Calibration | None = None):
    """SVD low-rank part + kept residual, optionally alternated and whitened."""
    m, n = weight.shape
    config.check_shape(m, n)
    w = weight.detach().to(torch.float64)
    chol = whitening_factor("losparse", calib) if config.whiten else None
    h = None if chol is None else calib.hessian.to(torch.float64)
    sparse = torch.zeros_like(w)
    best = None
    for _ in range(config.iters + 1):
        a, b = _low_rank(w - sparse, config.rank, chol)
        sparse = _keep(w - a @ b, config, chol)
        e = w - a @ b - sparse
        err = float(torch.linalg.norm(e)) if h is None else h_norm(e, h)
        if best is None or err < best[0]:
            best = (err, a, b, sparse)
    _, a, b, sparse = best
    a, b = a.to(weight.dtype), b.to(weight.dtype)
    keep = sparse != 0
    fb, gs = config.factor_bits, config.factor_group_size
    if fb != 16:  # the kept entries absorb the factors' rounding on their support
        a, b = factors.quantize_factor(a, fb, gs), factors.quantize_factor(b, fb, gs)
        low = (factors.dense(a) @ factors.dense(b)).to(torch.float64)
        sparse = (w - low) * keep
    if config.structured == "rows":
        rows = torch.nonzero(keep.any(1)).flatten()
        empty = CSR.from_dense(sparse, torch.zeros_like(sparse, dtype=torch.bool))
        return LowRankSparse(a, b, empty, rows, sparse[rows].to(weight.dtype))
    return LowRankSparse(a, b, CSR.from_dense(sparse.to(weight.dtype), keep))


def _low_rank(w: torch.Tensor, rank: int, chol: torch.Tensor | None):
    """(A, B) of the best rank-`rank` A B: Frobenius, or under ||. L||_F when whitened."""
    u, s, vt = torch.linalg.svd(w if chol is None else w @ chol, full_matrices=False)
    root = s[:rank].sqrt()
    a, b = u[:, :rank] * root, root[:, None] * vt[:rank]
    if chol is not None:  # B L^{-1}
        b = torch.linalg.solve_triangular(chol, b, upper=False, left=False)
    return a, b


def _keep(residual: torch.Tensor, config: LoSparseConfig, chol=None) -> torch.Tensor:
    m, n = residual.shape
    if config.structured == "rows":
        k = round((1 - config.sparsity) * m)
        size = residual.norm(dim=1) if chol is None else (residual @ chol).norm(dim=1)
        mask = top_k_mask(size, k)[:, None].expand(m, n)
    else:
        size = residual.abs()
        if chol is not None:  # ||X_j|| = sqrt(H_jj) = the norm of L's row j
            size = size * chol.norm(dim=1)[None, :]
        mask = top_k_mask(size, round((1 - config.sparsity) * m * n))
    return residual * mask


# planning: ranks (fractions of the break-even rank) x residual sparsities


def grid(m: int, n: int, floor: Floor, spectral: bool = False) -> list[LoSparseConfig]:
    rmax = break_even_rank(m, n)
    lo = floor.min_rank(min(m, n))
    ranks = sorted({max(lo, max(1, round(f * rmax))) for f in RANK_FRACTIONS})
    configs = [LoSparseConfig(rank=r, sparsity=sp) for r in ranks for sp in SPARSITIES]
    return [c for c in configs if c.cost(m, n)[0] < m * n]


def candidates(mod, dmg, floor: Floor, sigma=None, quick: bool = False) -> list[tuple]:
    """(config, damage) per setting of LoSparse's init (iters 0): one SVD, the residual's
    largest entries kept; whitened (by Wanda's score) under calibration damage."""
    m, n = mod.shape
    calib = dmg.calib(mod)
    if calib is not None:
        return _whitened_candidates(mod, dmg, floor, calib)
    residual = residuals(mod.weight)
    order = functools.cache(lambda r: torch.argsort(residual(r).abs().reshape(-1), descending=True))
    out = []
    for config in grid(m, n, floor):
        flat, largest = residual(config.rank).reshape(-1), order(config.rank)
        keep = m * n - round(config.sparsity * m * n)  # residual entries kept in S
        e = flat.clone()
        e[largest[:keep]] = 0  # the kept entries leave no error
        out.append((config, dmg(mod, e.reshape(m, n))))
    return out


def _whitened_candidates(mod, dmg, floor: Floor, calib) -> list[tuple]:
    """Whitened losparse (iters 0): U V = trunc_r(W L) L^{-1}, residual kept by Wanda score."""
    m, n = mod.shape
    w = mod.weight.double()
    chol = whitening_factor("losparse", calib)
    u, s, vh = torch.linalg.svd(w @ chol, full_matrices=False)
    back = torch.linalg.solve_triangular(chol, vh, upper=False, left=False)  # V^T L^{-1}
    col = chol.norm(dim=1)[None, :]
    out = []
    for config in grid(m, n, floor):
        r = config.rank
        residual = w - (u[:, :r] * s[:r]) @ back[:r]
        keep = m * n - round(config.sparsity * m * n)
        largest = torch.argsort((residual.abs() * col).reshape(-1), descending=True)
        e = residual.reshape(-1).clone()
        e[largest[:keep]] = 0
        config = LoSparseConfig(
            rank=r, sparsity=config.sparsity, structured=config.structured, whiten=True
        )
        out.append((config, dmg(mod, e.reshape(m, n))))
    return out


METHOD = Method(
    name="losparse",
    config_cls=LoSparseConfig,
    compress=compress,
    summary="U V + S: a rank-r SVD part and the residual kept sparse (unstructured or rows)",
    paper="LoSparse (Li et al. 2023), post-training form",
    data="whiten",
    knobs=(
        Knob("rank", "rank r of U V, 1..min(m, n)", 8, "int", 1),
        Knob(
            "sparsity", "fraction of the residual set to zero, in [0, 1)", 0.95, "float", 0.0, 1.0
        ),
        Knob(
            "structured",
            "none (top-|S| entries) or rows (whole rows of S)",
            "none",
            "choice",
            choices=STRUCTURES,
        ),
        Knob("iters", "alternating refinement steps after the SVD init", 0, "int", 0),
        Knob("whiten", "activation-aware low-rank part and residual scores", False, "bool"),
        *FACTOR_KNOBS,
    ),
    flags=("whiten",),
    columns=("rank", "sparsity"),
    defaults=lambda m, n: {"rank": max(1, half_rank(m, n) // 2), "sparsity": 0.95},
    grid=grid,
    candidates=candidates,
    factorizations=(LowRankSparse,),
    exports={"compressed-tensors": "low-rank + sparse: no compressed-tensors format"},
)
