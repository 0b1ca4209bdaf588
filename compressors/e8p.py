"""E8P: QuIP#'s 2-bit lattice codebook over blocks of 8 weights, with block LDLQ.

Codebook (Tseng et al. 2024, "QuIP#: Even Better LLM Quantization with Hadamard
Incoherence and Lattice Codebooks", section 4.2). E8 = D8 u (D8 + 1/2), D8 the integer
vectors of even coordinate sum. The 2^16 codewords are points of E8 + 1/4:
- 256 "absolute" patterns a with half-integer coordinates 1/2, 3/2, 5/2: the 227
  whose squared norm is at most 10, and 29 of the 56 of squared norm 12 with five 3/2
  and three 1/2 (QuIP# pads the ball to 256 this way; which 29 is not forced, here
  the first 29 by the positions of their 1/2's in lexicographic order);
- signs: any flips of the first seven coordinates; the eighth makes the coordinate sum
  even (so s . a lies in D8 + 1/2);
- a shift of +1/4 or -1/4 on every coordinate.
A code is 16 bits for 8 weights: 8 for the pattern, 7 for the signs, 1 for the shift.
Nearest-codeword search: for each shift, the best signs for a pattern are those of
the target, except when their parity is wrong, where the cheapest coordinate (least
a_i |y_i|) flips; the best pattern and shift then win. This is exact (tests compare
it with a brute-force search over all 2^16 codewords).

Weights are stored per row as scale_r * codewords (one 16-bit scale per row, chosen
by the least diag(H)-weighted squared error over a grid of multiples of the row's RMS,
on the weights before the sweep), so a matrix costs 2 bits per weight plus 16 bits per row. Block
LDLQ (QuIP#'s feedback over 8-column blocks): with U the upper Cholesky factor of
(H + damping)^-1, the columns are visited 8 at a time; each row's block is rounded to
its nearest codeword jointly, and the block's error E reaches the later columns as
W[:, later] -= E U_bb^-1 U_b,later, the exact block form of GPTQ's column update.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from functools import cache

import torch
from torch import nn

from compressors import rotation
from compressors.base import DENSE_BITS, Factorization, hessian_inverse_factor

DIM = 8
SCALES = torch.linspace(0.7, 1.3, 13, dtype=torch.float64)  # multiples of a row's RMS
CHUNK = 2048  # blocks searched at once (larger chunks leave the cache: 3x slower)


@cache
def patterns() -> torch.Tensor:
    """(256, 8) absolute patterns, as halves: 1, 3, 5 stand for 1/2, 3/2, 5/2."""
    ball = [p for p in itertools.product((1, 3, 5), repeat=DIM) if sum(x * x for x in p) <= 40]
    ball.sort(key=lambda p: (sum(x * x for x in p), p))
    assert len(ball) == 227  # the E8 points of the ball, up to signs
    shell = []
    for halves in itertools.combinations(range(DIM), 3):  # five 3/2, three 1/2: norm 12
        shell.append(tuple(1 if i in halves else 3 for i in range(DIM)))
    out = torch.tensor(ball + shell[:29], dtype=torch.float64) / 2
    return out


def decode(codes: torch.Tensor) -> torch.Tensor:
    """Codewords (..., 8) of 16-bit codes (any integer dtype)."""
    c = codes.to(torch.int64)
    a = patterns().to(c.device)[c & 255]
    bits = (c[..., None] >> (8 + torch.arange(7, device=c.device))) & 1
    signs = torch.ones(*c.shape, DIM, dtype=torch.float64, device=c.device)
    signs[..., :7] = 1 - 2 * bits.to(torch.float64)
    # the eighth sign makes sum(s * 2a) divisible by 4 (an even coordinate sum)
    partial = (signs[..., :7] * 2 * a[..., :7]).sum(-1) + 2 * a[..., 7]
    signs[..., 7] = torch.where(torch.remainder(partial, 4) == 0, 1.0, -1.0)
    shift = torch.where(((c >> 15) & 1) == 1, -0.25, 0.25)
    return signs * a + shift[..., None]


def nearest(x: torch.Tensor) -> torch.Tensor:
    """16-bit codes (int32) of the nearest codewords to the rows of x (B, 8)."""
    x = x.to(torch.float64)
    out = torch.empty(x.shape[0], dtype=torch.int32, device=x.device)
    for lo in range(0, x.shape[0], CHUNK):
        xb = x[lo : lo + CHUNK]
        best = None
        for bit, shift in ((0, 0.25), (1, -0.25)):
            d, code = _nearest_shifted(xb - shift)
            best = _keep_better(best, d, code | (bit << 15))
        out[lo : lo + CHUNK] = best[1].to(torch.int32)
    return out


@cache
def _tables():
    """(patterns, their squared norms, their parity bits) for the search."""
    pats = patterns()
    # sum(s_i 2a_i) = sum(2a_i) + 2 (number of minus signs) mod 4 (each 2a_i is odd), so
    # the signs' parity is wrong for a exactly when sum(2a)/2 and the number of minus
    # signs differ in parity
    parity = (2 * pats).sum(1).round().long().div(2, rounding_mode="floor") % 2
    return pats, (pats * pats).sum(1), parity.bool()


def _nearest_shifted(y: torch.Tensor):
    """(squared distance, code without the shift bit) of the nearest signed pattern.

    The distance of pattern a with y's own signs is |y|^2 - 2 |y| . a + |a|^2; when
    those signs have the wrong parity for a, the cheapest flip adds 4 min_i a_i |y_i|.
    No pattern with the wrong parity can win unless its unpenalized distance is below
    the best right-parity one, so the penalty is computed for those candidates only;
    the result is exact."""
    pats, norms, parity = _tables()
    neg = y < 0
    mag = y.abs()
    d = torch.addmm(norms, mag, pats.T, alpha=-2)  # (B, 256), without |y|^2
    odd = parity[None, :] ^ (neg.sum(1) % 2 == 1)[:, None]  # the signs' parity is wrong
    inf = torch.tensor(float("inf"), dtype=d.dtype, device=d.device)
    pen = torch.where(odd, inf, d)  # right parity: no penalty; wrong: not yet computed
    bound = pen.min(1, keepdim=True).values
    rows, ks = torch.nonzero(odd & (d < bound), as_tuple=True)
    pen[rows, ks] = d[rows, ks] + 4 * (mag[rows] * pats[ks]).min(1).values
    best, k = pen.min(1)
    r = torch.arange(y.shape[0], device=y.device)
    flip = odd[r, k]
    at = (mag * pats[k]).argmin(1)  # the coordinate flipped where the parity is wrong
    minus = neg.clone()
    fix = torch.nonzero(flip).flatten()
    minus[fix, at[fix]] = ~minus[fix, at[fix]]
    code = k | (minus[:, :7].long() << (8 + torch.arange(7, device=y.device))).sum(1)
    return best + (mag * mag).sum(1), code


def round_rows(w: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes (m, n/8), reconstruction) of w rounded to scale_r * codeword per row."""
    m, n = w.shape
    blocks = (w / scale[:, None]).reshape(-1, DIM)
    codes = nearest(blocks)
    return codes.reshape(m, n // DIM), decode(codes).reshape(m, n) * scale[:, None]


def row_scales(w: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Per-row scale: the multiple of the row RMS in SCALES with the least (column-
    weighted) squared rounding error, searched on at most SCALE_BLOCKS evenly spaced
    8-column blocks of each row (rows are near-Gaussian after incoherence processing)."""
    w = w.to(torch.float64)
    m, n = w.shape
    rms = w.pow(2).mean(1).sqrt().clamp_min(1e-12)
    dev = w.device
    d = torch.ones(n, dtype=torch.float64, device=dev) if weights is None else weights.double()
    d = d.to(dev)
    blocks = torch.linspace(0, n // DIM - 1, min(SCALE_BLOCKS, n // DIM), device=dev)
    cols = (blocks.round().long()[:, None] * DIM + torch.arange(DIM, device=dev)).flatten()
    ws, ds = w[:, cols], d[cols]
    best = None
    for t in SCALES:
        scale = rms * t
        _, rec = round_rows(ws, scale)
        best = _keep_better(best, ((ws - rec).pow(2) * ds).sum(1), scale)
    return best[1]


def _keep_better(best, err, value):
    """(error, value) per entry: the candidate's where its error is smaller than best's."""
    if best is None:
        return err, value
    better = err < best[0]
    return torch.where(better, err, best[0]), torch.where(better, value, best[1])


SCALE_BLOCKS = 32


def ldlq(w: torch.Tensor, h: torch.Tensor, factor=None):
    """(codes (m, n/8) int32, row scales (m,)) of w under H by block LDLQ (module doc)."""
    m, n = w.shape
    u, dead = factor if factor is not None else hessian_inverse_factor(h)
    w = w.detach().to(torch.float64).clone()
    w[:, dead] = 0
    scale = row_scales(w, torch.diagonal(h).to(torch.float64))
    codes = torch.empty(m, n // DIM, dtype=torch.int32, device=w.device)
    for b0 in range(0, n, DIM):
        b1 = b0 + DIM
        c, rec = round_rows(w[:, b0:b1], scale)
        codes[:, b0 // DIM] = c[:, 0]
        if b1 < n:
            err = torch.linalg.solve_triangular(
                u[b0:b1, b0:b1], w[:, b0:b1] - rec, upper=True, left=False
            )
            w[:, b1:] -= err @ u[b0:b1, b1:]
    return codes, scale


@dataclass
class E8PQuantized(Factorization):
    """W = diag(scales) x codewords: 16-bit codes per 8 weights, one scale per row."""

    codes: torch.Tensor  # (m, n / 8) int32 holding 16-bit codes
    scales: torch.Tensor  # (m,)

    @property
    def shape(self):
        return (self.codes.shape[0], self.codes.shape[1] * DIM)

    def to_dense(self):
        w = decode(self.codes).reshape(self.shape) * self.scales.double()[:, None]
        return w.to(self.scales.dtype)

    @property
    def n_params(self):
        return self.shape[0] * self.shape[1]

    @property
    def bits(self):
        return 16 * self.codes.numel() + DENSE_BITS * self.scales.numel()

    def as_module(self, bias=None):
        return E8PLinear(self, bias)


def e8p_cost(m: int, n: int) -> int:
    return 2 * m * n + DENSE_BITS * m


class E8PLinear(nn.Module):
    """Codes and row scales; the weight is decoded inside each forward."""

    def __init__(self, q: E8PQuantized, bias=None):
        super().__init__()
        self.register_buffer("codes", q.codes)
        self.register_buffer("scales", q.scales)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def forward(self, x):
        w = decode(self.codes).reshape(self.codes.shape[0], -1) * self.scales.double()[:, None]
        return nn.functional.linear(x, w.to(x.dtype), self.bias)


@dataclass
class QuipSharp(Factorization):
    """QuIP#-style W = U^T Q V: E8P codes Q of the rotated weight, rotations regenerated
    from their seed (compressors.rotation)."""

    q: E8PQuantized  # rotated coordinates
    seed: int

    @property
    def shape(self):
        return self.q.shape

    def rotations(self):
        return rotation.pair(*self.shape, self.seed)

    def to_dense(self):
        w = rotation.unrotate(self.q.to_dense().double(), self.rotations())  # U^T Q V
        return w.to(self.q.scales.dtype)

    @property
    def n_params(self):
        return self.q.n_params

    @property
    def bits(self):
        return self.q.bits + SEED_BITS

    def as_module(self, bias=None):
        return QuipSharpLinear(self, bias)


SEED_BITS = 64


class QuipSharpLinear(nn.Module):
    """y = U^T Q V x + b: x rotated, the codes decoded and applied, the output rotated."""

    def __init__(self, f: QuipSharp, bias=None):
        super().__init__()
        self.inner = E8PLinear(f.q)
        self.rot = f.rotations()
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def forward(self, x):
        dtype = x.dtype
        x = self.rot[1].apply(x.to(torch.float64)).to(dtype)  # x V^T
        y = self.rot[0].apply_inverse(self.inner(x).to(torch.float64)).to(dtype)  # (.) U
        return y if self.bias is None else y + self.bias


def quip_sharp(w: torch.Tensor, h: torch.Tensor, seed: int = 0) -> QuipSharp:
    """Incoherence rotations (W' = U W V^T, H' = V H V^T), then E8P block LDLQ."""
    u, v = rotation.pair(*w.shape, seed)
    wr = u.apply(v.apply(w.detach().to(torch.float64)).T).T
    hr = v.apply(v.apply(h.to(torch.float64)).T)
    codes, scale = ldlq(wr, hr)
    return QuipSharp(E8PQuantized(codes, scale.to(w.dtype)), seed)
