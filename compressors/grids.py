"""The scalar grids every quantizer here shares: per (row, group of columns) a scale and
a zero point, min-max or shrunk to the least (weighted) squared error (`observer:
mse`); codes, and back. compressors.quant's docstring says what each grid stores."""

from __future__ import annotations

import math

import numpy as np
import torch

SHRINKS = np.round(np.arange(1.0, 0.595, -0.01), 2)  # the mse observer's candidate factors


def dequantize(codes, scales, zeros, group_size):
    n = codes.shape[1]
    per_col = torch.arange(n, device=codes.device) // group_size
    return (codes.to(scales.dtype) - zeros[:, per_col]) * scales[:, per_col]


def grid(
    w: torch.Tensor,
    bits: int,
    group_size: int,
    symmetric: bool = False,
    observer: str = "minmax",
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-(row, group) scale and zero point of the min-max grid (float64), or of the
    mse observer's shrunk grid (squared error weighted per column by `weights`)."""
    m, n = w.shape
    if observer == "mse":
        wd = w.detach().to(torch.float64)
        d = torch.ones(n, dtype=torch.float64, device=w.device) if weights is None else weights
        d = d.to(torch.float64).to(w.device)
        parts = [
            group_grid(wd[:, g0 : g0 + group_size], bits, symmetric, "mse", d[g0 : g0 + group_size])
            for g0 in range(0, n, group_size)
        ]
        return torch.stack([p[0] for p in parts], 1), torch.stack([p[1] for p in parts], 1)
    groups = math.ceil(n / group_size)
    pad = groups * group_size - n
    wp = torch.nn.functional.pad(w, (0, pad), value=float("nan")).reshape(m, groups, group_size)
    lo = torch.nan_to_num(wp, nan=float("inf")).amin(-1).clamp(max=0)
    hi = torch.nan_to_num(wp, nan=float("-inf")).amax(-1).clamp(min=0)
    return _range_grid(lo, hi, bits, symmetric)


def quantize(w: torch.Tensor, scale, zero, bits: int, group_size: int) -> torch.Tensor:
    per_col = torch.arange(w.shape[1], device=w.device) // group_size
    q = torch.round(w / scale[:, per_col]) + zero[:, per_col]
    return q.clamp(0, 2**bits - 1)


def group_grid(
    block: torch.Tensor,
    bits: int,
    symmetric: bool = False,
    observer: str = "minmax",
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """grid() for one group of columns (rows, columns), float64 on its device; under
    "mse" the shrink factor is chosen per row, `weights` per column."""
    lo = block.amin(dim=1).clamp(max=0)
    hi = block.amax(dim=1).clamp(min=0)
    if observer != "mse":
        return _range_grid(lo, hi, bits, symmetric)
    if weights is None:
        d = torch.ones(block.shape[1], dtype=block.dtype, device=block.device)
    else:
        d = weights.clamp(min=0)
    top = 2**bits - 1
    best = torch.full((block.shape[0],), math.inf, dtype=block.dtype, device=block.device)
    scale, zero = _range_grid(lo, hi, bits, symmetric)
    for p in SHRINKS:
        s, z = _range_grid(lo * p, hi * p, bits, symmetric)
        q = torch.clamp(torch.round(block / s[:, None]) + z[:, None], 0, top)
        e = ((q - z[:, None]) * s[:, None] - block) ** 2 @ d
        better = e < best
        best = torch.where(better, e, best)
        scale, zero = torch.where(better, s, scale), torch.where(better, z, zero)
    return scale, zero


def half_exact(scale: torch.Tensor) -> torch.Tensor:
    """`scale` rounded to the nearest float16 value (kept in its dtype; 1 where that is
    0): every format that stores scales in 16 bits (GGUF's blocks, compressed-tensors in
    float16) then holds the very grid the codes were computed on."""
    s = scale.to(torch.float16).to(scale.dtype)
    return torch.where(s > 0, s, torch.ones_like(s))


def scale_dtype(dtype: torch.dtype) -> torch.dtype:
    """A dtype that holds float16 scales exactly next to weights of `dtype` (bfloat16's
    8-bit mantissa does not: float32 then)."""
    return torch.promote_types(dtype, torch.float16)


def _range_grid(lo, hi, bits, symmetric):
    if symmetric:
        scale = half_exact(torch.maximum(-lo, hi) / ((2**bits - 1) / 2))
        return scale, torch.full_like(scale, 2 ** (bits - 1))
    scale = half_exact((hi - lo) / (2**bits - 1))
    return scale, torch.round(-lo / scale)
