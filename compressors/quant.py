"""Group-wise round-to-nearest weight quantization (the RTN baseline of GPTQ-era papers).

Each output row is cut into groups of `group_size` consecutive input columns (the
last group may be shorter); each group gets an asymmetric min-max grid of 2^bits
levels: scale = (max - min) / (2^bits - 1), zero = round(-min / scale), code =
clamp(round(w / scale) + zero, 0, 2^bits - 1). Storage: `bits` per weight plus a
16-bit scale and a 16-bit zero point per group.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from compressors.base import DENSE_BITS, Calibration, Factorization, config_error


@dataclass(frozen=True)
class QuantConfig:
    """Settings of `quant`.

    Attributes:
        bits: bits per weight, 2..8.
        group_size: input columns sharing one scale and zero point (>= 1).
    """

    method: ClassVar[str] = "quant"
    bits: int = 4
    group_size: int = 128

    def __post_init__(self):
        if not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise config_error(self.method, "bits", self.bits, "must be an integer in 2..8")
        if not isinstance(self.group_size, int) or self.group_size < 1:
            raise config_error(self.method, "group_size", self.group_size, "must be >= 1")

    def check_shape(self, m: int, n: int) -> None:
        pass


@dataclass
class Quantized(Factorization):
    codes: torch.Tensor  # (m, n) uint8 in [0, 2^bits)
    scales: torch.Tensor  # (m, groups)
    zeros: torch.Tensor  # (m, groups)
    nbits: int
    group_size: int

    @property
    def shape(self):
        return tuple(self.codes.shape)

    def to_dense(self):
        return dequantize(self.codes, self.scales, self.zeros, self.group_size)

    @property
    def n_params(self):
        return self.codes.numel()

    @property
    def bits(self):
        return self.nbits * self.codes.numel() + 2 * DENSE_BITS * self.scales.numel()

    def as_module(self, bias=None):
        return QuantLinear(self, bias)


class QuantLinear(nn.Module):
    """Keeps codes, scales and zero points; dequantizes the weight inside each forward."""

    def __init__(self, q: Quantized, bias=None):
        super().__init__()
        self.group_size = q.group_size
        self.register_buffer("codes", q.codes)
        self.register_buffer("scales", q.scales)
        self.register_buffer("zeros", q.zeros)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def forward(self, x):
        w = dequantize(self.codes, self.scales, self.zeros, self.group_size).to(x.dtype)
        return nn.functional.linear(x, w, self.bias)


def dequantize(codes, scales, zeros, group_size):
    n = codes.shape[1]
    per_col = torch.arange(n) // group_size
    return (codes.to(scales.dtype) - zeros[:, per_col]) * scales[:, per_col]


def grid(w: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-(row, group) scale and zero point of the min-max grid (float64)."""
    m, n = w.shape
    groups = math.ceil(n / group_size)
    pad = groups * group_size - n
    wp = torch.nn.functional.pad(w, (0, pad), value=float("nan")).reshape(m, groups, group_size)
    lo = torch.nan_to_num(wp, nan=float("inf")).amin(-1).clamp(max=0)
    hi = torch.nan_to_num(wp, nan=float("-inf")).amax(-1).clamp(min=0)
    scale = (hi - lo) / (2**bits - 1)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return scale, torch.round(-lo / scale)


def quantize(w: torch.Tensor, scale, zero, bits: int, group_size: int) -> torch.Tensor:
    per_col = torch.arange(w.shape[1]) // group_size
    q = torch.round(w / scale[:, per_col]) + zero[:, per_col]
    return q.clamp(0, 2**bits - 1)


def compress(weight: torch.Tensor, config: QuantConfig, calib: Calibration | None = None):
    """Group-wise asymmetric round-to-nearest."""
    w = weight.detach().to(torch.float64)
    scale, zero = grid(w, config.bits, config.group_size)
    codes = quantize(w, scale, zero, config.bits, config.group_size).to(torch.uint8)
    return Quantized(
        codes, scale.to(weight.dtype), zero.to(weight.dtype), config.bits, config.group_size
    )
