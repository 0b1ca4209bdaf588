"""Quantized factors: the `factor_bits` / `factor_group_size` knobs of lowrank, joint,
losparse and mpo (CALDERA quantizes its own factors with LDLQ, compressors.caldera).

A factor (a low-rank factor, joint's shared projection, an MPO core of any order) is
viewed as a matrix whose columns are its last axis (an MPO core (r, m_k, n_k, r') as
(r m_k, n_k r')) and quantized group-wise along those columns, `factor_group_size`
columns (at most the number there are) sharing a 16-bit scale and zero point, codes of
`factor_bits` bits, round-to-nearest on the min-max grid (asymmetric). This is the
"MPO + int4" of CompactifAI and the quantized factors of joint rank-k. 16 bits means
unquantized (an ordinary float tensor). Storage counts codes, scales and zero points.

A factorization field holds either a float tensor or a `QuantizedFactor`; `dense(x)`
gives the float tensor either way, and `hold(module, name, x)` registers it on a
compact module as a frozen parameter or as a `FactorModule` that dequantizes in its
forward (the weight is never stored in float).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from compressors.base import DENSE_BITS, config_error, require_int
from compressors.grids import dequantize
from compressors.quant import Quantized, round_to_nearest

FACTOR_BITS = (2, 3, 4, 5, 6, 7, 8, 16)


def check(method: str, bits, group_size) -> None:
    """factor_bits in FACTOR_BITS and factor_group_size >= 1, or a ConfigError."""
    if bits not in FACTOR_BITS or isinstance(bits, bool):
        raise config_error(method, "factor_bits", bits, "must be 2..8, or 16 (unquantized)")
    require_int(method, "factor_group_size", group_size, 1)


def matrix_shape(shape) -> tuple[int, int]:
    """(rows, columns) of the matrix view that a factor of `shape` is quantized as."""
    shape = tuple(shape)
    if len(shape) == 2:
        return shape
    return math.prod(shape[:2]), math.prod(shape[2:])


def factor_cost(shape, bits: int, group_size: int) -> int:
    """Bits that a factor of `shape` takes at `bits` (16: unquantized)."""
    rows, cols = matrix_shape(shape)
    if bits == 16:
        return DENSE_BITS * rows * cols
    return bits * rows * cols + 2 * DENSE_BITS * rows * math.ceil(cols / min(group_size, cols))


@dataclass
class QuantizedFactor:
    """A factor stored as group-wise codes of its matrix view."""

    q: Quantized
    shape: list  # the factor's own shape

    def to_dense(self) -> torch.Tensor:
        return self.q.to_dense().reshape(self.shape)

    @property
    def bits(self) -> int:
        return self.q.bits

    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class Plain:
    """An unquantized factor held as such (CALDERA's L and R at factor_bits = 16)."""

    value: torch.Tensor

    def to_dense(self):
        return self.value

    @property
    def bits(self):
        return DENSE_BITS * self.value.numel()


class QuantizedFactors:
    """Healing's hooks (compressors.base.Factorization) for a factorization whose
    quantized parts are QuantizedFactor fields or lists of them (`factor_bits` < 16)."""

    healable: ClassVar[bool] = True

    def float_factors(self) -> dict:
        old = {}
        for f in dataclasses.fields(self):
            part = getattr(self, f.name)
            if isinstance(part, QuantizedFactor):
                old[(f.name, None)] = part
                setattr(self, f.name, part.to_dense().contiguous())
            elif isinstance(part, list):
                for i, x in enumerate(part):
                    if isinstance(x, QuantizedFactor):
                        old[(f.name, i)] = x
                        part[i] = x.to_dense().contiguous()
        return old

    def on_grid(self, value: torch.Tensor, old):
        return requantize(value, old)


def quantize_factor(t: torch.Tensor, bits: int, group_size: int):
    """`t` itself at 16 bits, else its QuantizedFactor (RTN, min-max, asymmetric)."""
    if bits == 16:
        return t
    rows, cols = matrix_shape(t.shape)
    q = round_to_nearest(t.reshape(rows, cols), bits, min(group_size, cols))
    return QuantizedFactor(q, list(t.shape))


def requantize(value: torch.Tensor, like: QuantizedFactor) -> QuantizedFactor:
    """`value` quantized again on `like`'s bits and groups (after healing)."""
    q = quantize_factor(value.to(like.q.scales.dtype), like.q.nbits, like.q.group_size)
    return q


def stack_rows(parts: list):
    """Factors of equal columns stacked by rows (codes stacked: rows are grouped alone)."""
    if not isinstance(parts[0], QuantizedFactor):
        return torch.cat(parts)
    qs = [p.q for p in parts]
    q = Quantized(
        torch.cat([x.codes for x in qs]),
        torch.cat([x.scales for x in qs]),
        torch.cat([x.zeros for x in qs]),
        qs[0].nbits,
        qs[0].group_size,
    )
    return QuantizedFactor(q, [sum(p.shape[0] for p in parts), parts[0].shape[1]])


def dense(x) -> torch.Tensor:
    return x.to_dense() if isinstance(x, QuantizedFactor) else x


def bits_of(x) -> int:
    return x.bits if isinstance(x, QuantizedFactor) else DENSE_BITS * x.numel()


class FactorModule(nn.Module):
    """Codes, scales and zero points of a quantized factor; forward() dequantizes."""

    def __init__(self, f: QuantizedFactor):
        super().__init__()
        self.shape, self.group_size = list(f.shape), f.q.group_size
        self.register_buffer("codes", f.q.codes)
        self.register_buffer("scales", f.q.scales)
        self.register_buffer("zeros", f.q.zeros)

    def forward(self):
        w = dequantize(self.codes, self.scales, self.zeros, self.group_size)
        return w.reshape(self.shape)


def hold(module: nn.Module, name: str, x) -> None:
    """Register factor `x` on `module` under `name`: a frozen parameter, or a FactorModule."""
    if isinstance(x, QuantizedFactor):
        setattr(module, name, FactorModule(x))
    else:
        setattr(module, name, nn.Parameter(x, requires_grad=False))


def value(module: nn.Module, name: str) -> torch.Tensor:
    """The float factor that `hold` registered under `name`."""
    x = getattr(module, name)
    return x() if isinstance(x, FactorModule) else x
