"""Unstructured pruning baselines: magnitude (Han et al. 2015) and Wanda (Sun et al. 2023).

Magnitude: the `sparsity` fraction of entries with the smallest |W| in the matrix
is set to zero. Wanda: entries are scored |W_ij| * ||X_j||_2 with the calibration
activations' input-feature norms, and each output row drops its lowest-scoring
`sparsity` fraction (the paper's per-output comparison group). Kept entries are
stored in CSR form.

SparseGPT (Frantar & Alistarh 2023): the OBS reconstruction of GPTQ with pruning
instead of rounding. With U the upper Cholesky factor of (H + 1% mean diag)^-1,
columns are visited in blocks of 128; at a block's start its mask is chosen on the
weights as updated so far (adaptive mask selection), pruning the entries of least
saliency w^2 / U_ii^2, exactly round(sparsity * rows * width) of the block (the
reference takes a threshold; a count keeps the cost exact); then column by column a
pruned entry's value, divided by U_ii, is pushed onto the later columns of its row
through U's row, which minimises ||(W - W_hat) X^T||_F greedily; the block's errors
reach later blocks in one product ("lazy batch"). Kept entries carry the updated
values.

`pattern: "N:M"` (semi-structured, e.g. NVIDIA's 2:4): every run of M consecutive
input weights of a row keeps exactly N, by |W| (magnitude), |W| * ||X_j|| (Wanda) or,
for SparseGPT, the least saliency pruned within each group, chosen when the sweep
reaches the group's first column (the reference's `prunen`/`prunem`). The pattern
fixes sparsity at 1 - N/M. Storage counts what the semi-structured layout holds: N
16-bit values and N ceil(log2 M)-bit positions per group (2:4: 4 metadata bits per
four weights), no row pointers.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import ClassVar

import torch

from compressors.base import DENSE_BITS, Calibration, Factorization, config_error, csr_index_bits
from compressors.method import Floor, Knob, Method
from compressors.sparse import CSR, SparseLinear, nm_mask, top_k_mask

SPARSEGPT_BLOCK = 128  # columns per mask-selection block (the reference's blocksize)
MAX_GROUP = 128  # the largest M of an N:M pattern
GRID_SPARSITY = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)  # offered to allocation
PATTERNS = ("2:4", "4:8")  # the semi-structured patterns the app offers


def parse_pattern(pattern: str) -> tuple[int, int]:
    """(N, M) of an "N:M" pattern: N kept in every M consecutive input weights."""
    match = re.fullmatch(r"(\d+):(\d+)", pattern) if isinstance(pattern, str) else None
    n, m = (int(match[1]), int(match[2])) if match else (0, 0)
    if not 1 <= n < m <= MAX_GROUP:
        raise config_error(
            "prune", "pattern", pattern, f'must be "N:M" with 1 <= N < M <= {MAX_GROUP}, e.g. "2:4"'
        )
    return n, m


def pattern_cost(rows: int, cols: int, pattern: str) -> tuple[int, int]:
    """(kept values, bits) of the semi-structured layout: N values + N positions per group."""
    n, m = parse_pattern(pattern)
    nnz = rows * (cols // m) * n
    return nnz, nnz * (DENSE_BITS + math.ceil(math.log2(m)))


@dataclass(frozen=True)
class PruneConfig:
    """Settings of `prune`.

    Attributes:
        sparsity: fraction of weights set to zero, in [0, 1); 0.5 by default, 1 - N/M
            with a pattern.
        wanda: score by |W| times activation norm, per output row (needs calibration).
        sparsegpt: SparseGPT's OBS reconstruction under H (needs calibration).
        pattern: "N:M" semi-structured sparsity (N kept in every M consecutive input
            weights of a row, e.g. "2:4"), or None for unstructured.
    """

    method: ClassVar[str] = "prune"
    sparsity: float | None = None
    wanda: bool = False
    sparsegpt: bool = False
    pattern: str | None = None

    def __post_init__(self):
        if self.pattern is not None:
            n, m = parse_pattern(self.pattern)
            if self.sparsity is not None and not math.isclose(self.sparsity, 1 - n / m):
                raise config_error(
                    self.method,
                    "sparsity",
                    self.sparsity,
                    f"pattern {self.pattern} fixes sparsity at {1 - n / m:g}",
                )
            object.__setattr__(self, "sparsity", 1 - n / m)
        elif self.sparsity is None:
            object.__setattr__(self, "sparsity", 0.5)
        if isinstance(self.sparsity, bool) or not isinstance(self.sparsity, int | float):
            raise config_error(self.method, "sparsity", self.sparsity, "must be a number")
        if not 0 <= self.sparsity < 1:
            raise config_error(self.method, "sparsity", self.sparsity, "must be in [0, 1)")
        if self.wanda and self.sparsegpt:
            raise config_error(self.method, "sparsegpt", True, "choose wanda or sparsegpt")

    def check_shape(self, m: int, n: int) -> None:
        if self.pattern is not None and n % parse_pattern(self.pattern)[1]:
            group = parse_pattern(self.pattern)[1]
            raise config_error(
                self.method,
                "pattern",
                self.pattern,
                f"needs in_features divisible by {group}, this module has {n}",
            )

    def cost(self, m: int, n: int) -> tuple[int, int]:
        if self.pattern is not None:
            return pattern_cost(m, n, self.pattern)
        if self.wanda:
            nnz = round((1 - self.sparsity) * n) * m
        elif self.sparsegpt:
            nnz = sum(
                m * w - round(self.sparsity * m * w)
                for w in (min(SPARSEGPT_BLOCK, n - lo) for lo in range(0, n, SPARSEGPT_BLOCK))
            )
        else:
            nnz = round((1 - self.sparsity) * m * n)
        return nnz, DENSE_BITS * nnz + csr_index_bits(m, n, nnz)


@dataclass
class Pruned(Factorization):
    """Kept weights in CSR; with `pattern` stored (and counted) as N:M semi-structured."""

    s: CSR
    pattern: str | None = None

    @property
    def shape(self):
        return self.s.shape

    def to_dense(self):
        return self.s.to_dense()

    @property
    def n_params(self):
        return self.s.nnz if self.pattern is None else pattern_cost(*self.shape, self.pattern)[0]

    @property
    def bits(self):
        return self.s.bits if self.pattern is None else pattern_cost(*self.shape, self.pattern)[1]

    def as_module(self, bias=None):
        return SparseLinear(self.s, bias)


def compress(weight: torch.Tensor, config: PruneConfig, calib: Calibration | None = None):
    """Keep the largest-|W| (1 - sparsity) fraction, Wanda's top scores per row, or
    SparseGPT's reconstruction (each within N:M groups under a `pattern`)."""
    w = weight.detach()
    config.check_shape(*w.shape)
    nm = None if config.pattern is None else parse_pattern(config.pattern)
    if config.sparsegpt:
        if calib is None:
            raise config_error("prune", "sparsegpt", True, "needs calibration data")
        values, keep = sparsegpt(w.to(torch.float64), calib.hessian, config.sparsity, nm=nm)
        return Pruned(CSR.from_dense(values.to(w.dtype), keep), config.pattern)
    if config.wanda and calib is None:
        raise config_error("prune", "wanda", True, "needs calibration data")
    score = w.abs().to(torch.float64)
    if config.wanda:
        score = score * calib.col_norms[None, :]
    if nm is not None:
        keep = nm_mask(score, *nm)
    elif not config.wanda:
        keep = top_k_mask(score, round((1 - config.sparsity) * w.numel()))
    else:
        k = round((1 - config.sparsity) * w.shape[1])
        keep = torch.zeros_like(score, dtype=torch.bool)
        if k > 0:
            keep.scatter_(1, torch.topk(score, k, dim=1).indices, True)
    return Pruned(CSR.from_dense(w, keep), config.pattern)


def sparsegpt(
    w: torch.Tensor,
    h: torch.Tensor,
    sparsity: float,
    block: int = SPARSEGPT_BLOCK,
    nm: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT: (reconstructed weights, keep mask) of w (m, n) under H (n, n); with
    `nm` = (N, M), N kept per M consecutive columns, each group's mask chosen on the
    weights as updated when the sweep reaches it."""
    from compressors.quant import hessian_inverse_factor

    m, n = w.shape
    if nm is not None:
        block = max(nm[1], block // nm[1] * nm[1])  # groups never straddle two blocks
    u, dead = hessian_inverse_factor(h)
    w = w.clone()
    w[:, dead] = 0
    keep = torch.ones(m, n, dtype=torch.bool, device=w.device)
    for b0 in range(0, n, block):
        b1 = min(b0 + block, n)
        w1, u1 = w[:, b0:b1], u[b0:b1, b0:b1]
        d1 = torch.diagonal(u1).pow(2)
        if nm is None:
            saliency = w1.pow(2) / d1[None, :]
            k = round(sparsity * saliency.numel())
            mask = ~top_k_mask(-saliency, k) if k else torch.ones_like(saliency, dtype=torch.bool)
        else:
            mask = torch.ones_like(w1, dtype=torch.bool)
        err = torch.zeros_like(w1)
        for i in range(b1 - b0):
            if nm is not None and i % nm[1] == 0:  # the group's mask, on the updated weights
                g = slice(i, i + nm[1])
                mask[:, g] = nm_mask(w1[:, g].pow(2) / d1[None, g], *nm)
            col = w1[:, i]
            q = torch.where(mask[:, i], col, torch.zeros_like(col))
            e = (col - q) / u1[i, i]
            w1[:, i:] -= e[:, None] * u1[i, i:][None, :]
            w1[:, i] = q
            err[:, i] = e
        keep[:, b0:b1] = mask
        if b1 < n:
            w[:, b1:] -= err @ u[b0:b1, b1:]
    return w * keep, keep


# planning: sparsities and the 2:4 pattern, per scorer


def grid(m: int, n: int, floor: Floor, spectral: bool = False) -> list[PruneConfig]:
    if floor.bits > 0 or floor.rank > 0:
        return []  # a floor on this role: pruning cannot honour it
    return [PruneConfig(sparsity=s) for s in GRID_SPARSITY]


def candidates(mod, dmg, floor: Floor, sigma=None, quick: bool = False) -> list[tuple]:
    """(config, damage): magnitude pruning read off the sorted magnitudes; under
    calibration damage Wanda and SparseGPT measured on their result (`quick`: Wanda
    only, one OBS reconstruction per sparsity spared)."""
    m, n = mod.shape
    configs = grid(m, n, floor)
    if not configs:
        return []
    calib = dmg.calib(mod)
    if calib is not None:  # Wanda: |W| ||X_j|| per output row; SparseGPT: OBS under H
        kinds = ("wanda",) if quick else ("wanda", "sparsegpt")
        out = []
        for config in configs:
            for kind in kinds:
                config = PruneConfig(sparsity=config.sparsity, **{kind: True})
                kept = compress(mod.weight, config, calib).to_dense()
                out.append((config, dmg(mod, mod.weight - kept.to(mod.weight.dtype))))
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
            e = torch.zeros(m * n, device=mod.weight.device)
            e[order[:k]] = mod.weight.reshape(-1)[order[:k]]
            d = dmg(mod, e.reshape(m, n))
        out.append((config, d))
    return out + _semi_structured(mod, dmg, ("magnitude",), None)


def _semi_structured(mod, dmg, kinds, calib) -> list[tuple]:
    """The 2:4 pattern that engines accelerate, for each scorer, where the row divides."""
    if mod.shape[1] % 4:
        return []
    out = []
    for kind in kinds:
        knobs = {} if kind == "magnitude" else {kind: True}
        config = PruneConfig(pattern="2:4", **knobs)
        e = mod.weight - compress(mod.weight, config, calib).to_dense().to(mod.weight.dtype)
        if dmg.spectral:
            total = float(mod.weight.double().pow(2).sum())
            d = dmg.relative(mod.name, float(e.double().pow(2).sum()), total)
        else:
            d = dmg(mod, e)
        out.append((config, d))
    return out


METHOD = Method(
    name="prune",
    data_free_e=0.3,  # AlphaPruning's e with magnitude pruning
    config_cls=PruneConfig,
    compress=compress,
    summary="the kept weights in CSR (or an N:M semi-structured layout): magnitude, Wanda "
    "or SparseGPT",
    paper="",
    data="optional",
    knobs=(
        Knob(
            "sparsity",
            "fraction of weights set to zero, in [0, 1) (default 0.5)",
            None,
            "float",
            0.0,
            1.0,
        ),
        Knob(
            "wanda",
            "score |W| by activation norm, per output row (needs calibration)",
            False,
            "bool",
        ),
        Knob(
            "sparsegpt", "SparseGPT's OBS reconstruction under H (needs calibration)", False, "bool"
        ),
        Knob(
            "pattern",
            "N:M semi-structured sparsity, e.g. 2:4 (fixes the sparsity)",
            None,
            "choice",
            choices=PATTERNS,
            overrides=("sparsity",),
        ),
    ),
    flags=("wanda", "sparsegpt"),
    columns=("sparsity", "pattern"),
    grid=grid,
    candidates=candidates,
    factorizations=(Pruned,),
    mixed=True,
    exports={
        "compressed-tensors": "sparse: compressed-tensors >= 0.15 (what transformers 5 needs) "
        "has no sparse layout; zeros kept"
    },
)
