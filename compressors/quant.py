"""Group-wise weight quantization: round-to-nearest, or GPTQ / LDLQ with calibration.

RTN: each output row is cut into groups of `group_size` consecutive input columns (the
last group may be shorter); each group gets an asymmetric min-max grid of 2^bits
levels: scale = (max - min) / (2^bits - 1), zero = round(-min / scale), code =
clamp(round(w / scale) + zero, 0, 2^bits - 1). Storage: `bits` per weight plus a
16-bit scale and a 16-bit zero point per group. `symmetric`: the grid of
compressed-tensors (llm-compressor, vLLM): scale = max|w| / ((2^bits - 1) / 2), signed
codes in [-2^(bits-1), 2^(bits-1) - 1] (stored offset by 2^(bits-1)), no zero point
stored: 16 bits per group instead of 32. Every scale is rounded to a float16 value
before any code is computed (held in float32 beside bfloat16 weights), so a format that
stores scales in 16 bits (GGUF's Q4_0/Q8_0/Q4_1 blocks, compressed-tensors in float16)
keeps exactly the grid the codes were chosen on.

GPTQ (Frantar et al. 2022; the same update as LDLQ in QuIP, Chee et al. 2023):
columns are quantized in order and each column's rounding error, scaled by the
upper Cholesky factor U of H^{-1} (H = X^T X + 1% of its mean diagonal), is pushed
onto the columns not yet quantized, which minimises ||(W - Q) X^T||_F greedily.
A group's grid is fixed when its first column is reached, from the updated
weights (GPTQ's default). Columns are processed in blocks of 128 with the update
to later blocks applied once per block ("lazy batch"), which is exact.

`act_order` (GPTQ's "act-order", llm-compressor's `actorder: static`): columns are
processed in decreasing diag(H), the ones the inputs excite most first, so their
rounding errors can still be absorbed by many later columns; every group's grid is
fixed beforehand from the original weights (a group's columns are no longer
consecutive in processing order), and the permutation is undone, so the stored
codes, groups and forward are those of the plain layout.

`observer: mse` (the GPTQ reference's `mse=True`, llm-compressor's `mse` observer):
each group's grid is the min-max grid shrunk by the factor p in {1, 0.99, ..., 0.6}
that leaves the least squared rounding error, weighted per input column by diag(H)
when calibration is given (the error GPTQ itself minimises, to first order): clipping
a few outliers buys every other weight a finer step. Same storage as min-max.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from compressors import e8p
from compressors.base import (  # noqa: F401 (re-exported)
    DAMP,
    DENSE_BITS,
    Calibration,
    Factorization,
    config_error,
    hessian_inverse_factor,
)
from compressors.gptq import ldlq
from compressors.grids import dequantize, grid, quantize, scale_dtype
from compressors.method import Floor, Knob, Method

OBSERVERS = ("minmax", "mse")
GRID_BITS = (2, 3, 4, 5, 6, 7, 8)  # offered to allocation, at GRID_GROUP columns per group
GRID_GROUP = 128


@dataclass(frozen=True)
class QuantConfig:
    """Settings of `quant`.

    Attributes:
        bits: bits per weight, 2..8.
        group_size: input columns sharing one scale and zero point (>= 1).
        gptq: error feedback through the calibration Hessian (needs calibration data).
        act_order: GPTQ in decreasing diag(H) with grids fixed from the original
            weights (needs gptq); default: on with gptq.
        symmetric: a symmetric grid with no zero point stored (else asymmetric).
        observer: how a group's grid is chosen: "minmax" (its range) or "mse" (the
            shrunk range with the least, diag(H)-weighted, squared rounding error);
            default: "mse" with gptq, "minmax" for round-to-nearest (the app's live
            preview path, 20x cheaper).
        quantizer: "scalar" (the group-wise grid) or "e8p": with gptq and 2 bits,
            QuIP#-style (incoherence rotations, E8P lattice codes, block LDLQ;
            compressors.e8p), 2 bits per weight plus 16 per row; group_size,
            symmetric, observer and act_order do not apply to it.

    The defaults come from benchmarks/bench_peers.py (README, "Against
    llm-compressor"): act-order and the mse grid each lower GPTQ's perplexity on the
    demo at 3 and 4 bits.
    """

    method: ClassVar[str] = "quant"
    bits: int = 4
    group_size: int = 128
    gptq: bool = False
    act_order: bool | None = None
    symmetric: bool = False
    observer: str | None = None
    quantizer: str = "scalar"

    def __post_init__(self):
        gptq = self.gptq if isinstance(self.gptq, bool) else False
        if self.act_order is None:
            object.__setattr__(self, "act_order", gptq)
        if self.observer is None:
            object.__setattr__(self, "observer", "mse" if gptq else "minmax")
        if not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise config_error(self.method, "bits", self.bits, "must be an integer in 2..8")
        if not isinstance(self.group_size, int) or self.group_size < 1:
            raise config_error(self.method, "group_size", self.group_size, "must be >= 1")
        for name in ("gptq", "act_order", "symmetric"):
            if not isinstance(getattr(self, name), bool):
                raise config_error(self.method, name, getattr(self, name), "must be true or false")
        if self.act_order and not self.gptq:
            raise config_error(self.method, "act_order", True, "orders GPTQ's columns: needs gptq")
        if self.observer not in OBSERVERS:
            raise config_error(
                self.method, "observer", self.observer, f"must be one of {', '.join(OBSERVERS)}"
            )
        check_quantizer(self.method, self.quantizer, self.bits)
        if self.quantizer == "e8p" and not self.gptq:
            raise config_error(self.method, "quantizer", "e8p", "is QuIP#-style: needs gptq")

    def check_shape(self, m: int, n: int) -> None:
        check_e8p_shape(self.method, self.quantizer, n)

    def cost(self, m: int, n: int) -> tuple[int, int]:
        if self.quantizer == "e8p":
            from compressors import e8p

            return m * n, e8p.e8p_cost(m, n) + e8p.SEED_BITS
        per_group = (1 if self.symmetric else 2) * DENSE_BITS
        return m * n, self.bits * m * n + per_group * m * math.ceil(n / self.group_size)


@dataclass
class Quantized(Factorization):
    codes: torch.Tensor  # (m, n) uint8 in [0, 2^bits)
    scales: torch.Tensor  # (m, groups)
    zeros: torch.Tensor  # (m, groups)
    nbits: int
    group_size: int
    symmetric: bool = False  # the zeros are the constant 2^(bits-1), not stored

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
        per_group = (1 if self.symmetric else 2) * DENSE_BITS
        return self.nbits * self.codes.numel() + per_group * self.scales.numel()

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


def round_to_nearest(w: torch.Tensor, bits: int, group_size: int, symmetric: bool = False):
    """`w` (m, n) as a Quantized on its min-max grid, round-to-nearest; scales in w's dtype."""
    wd = w.detach().to(torch.float64)
    scale, zero = grid(wd, bits, group_size, symmetric)
    codes = quantize(wd, scale, zero, bits, group_size).to(torch.uint8)
    held = scale_dtype(w.dtype)
    return Quantized(codes, scale.to(held), zero.to(held), bits, group_size, symmetric)


def compress(weight: torch.Tensor, config: QuantConfig, calib: Calibration | None = None):
    """Group-wise round-to-nearest, or GPTQ when `config.gptq`."""
    if config.gptq and calib is None:
        raise config_error("quant", "gptq", True, "needs calibration data")
    if config.quantizer == "e8p":
        config.check_shape(*weight.shape)
        return e8p.quip_sharp(weight, calib.hessian)
    if config.gptq:  # ldlq widens the one copy it works on
        codes, scale, zero = ldlq(
            weight.detach(),
            calib.hessian,
            config.bits,
            config.group_size,
            act_order=config.act_order,
            symmetric=config.symmetric,
            observer=config.observer,
        )
    else:
        w = weight.detach().to(torch.float64)
        scale, zero = grid(w, config.bits, config.group_size, config.symmetric, config.observer)
        codes = quantize(w, scale, zero, config.bits, config.group_size)
    return Quantized(
        codes.to(torch.uint8),
        scale.to(scale_dtype(weight.dtype)),
        zero.to(scale_dtype(weight.dtype)),
        config.bits,
        config.group_size,
        config.symmetric,
    )


QUANTIZERS = ("scalar", "e8p")

# llama.cpp's block types that hold a grid's own codes: 32 weights share one float16
# scale (Q4_1: and a float16 minimum); by (bits, symmetric)
GGUF_BLOCKS = {(4, True): "Q4_0", (8, True): "Q8_0", (4, False): "Q4_1"}


def grid_of(f) -> tuple[int, int, bool] | None:
    """(bits, group size, symmetric) of a scalar grid; None for anything else."""
    return (f.nbits, f.group_size, f.symmetric) if isinstance(f, Quantized) else None


def gguf_block(grid: tuple[int, int, bool] | None) -> str | None:
    """The GGUF block type holding this grid's codes exactly, or None."""
    if grid is None or grid[1] != 32:
        return None
    return GGUF_BLOCKS.get((grid[0], grid[2]))


def gguf_reason(grid: tuple[int, int, bool] | None) -> str | None:
    """None when a GGUF block holds the grid, else why the module is requantized."""
    if grid is None:
        return "E8P lattice codes: no GGUF block type"
    if gguf_block(grid) is not None:
        return None
    bits, group, symmetric = grid
    kind = "symmetric" if symmetric else "asymmetric"
    return (
        f"{kind} {bits}-bit grid in groups of {group}: no GGUF block type holds it "
        "(Q4_0, Q8_0: symmetric 4 and 8 bits; Q4_1: asymmetric 4 bits; groups of 32)"
    )


def check_quantizer(method: str, quantizer, bits) -> None:
    if quantizer not in QUANTIZERS:
        raise config_error(
            method, "quantizer", quantizer, f"must be one of {', '.join(QUANTIZERS)}"
        )
    if quantizer == "e8p" and bits != 2:
        raise config_error(method, "bits", bits, "the e8p codebook is 2 bits per weight")


def check_e8p_shape(method: str, quantizer: str, n: int) -> None:
    if quantizer == "e8p" and n % 8:
        raise config_error(
            method, "quantizer", "e8p", f"codes blocks of 8 inputs; this module has {n}"
        )


# planning: bit widths, damage measured on the result (GPTQ under calibration damage)


# `plan auto --preset`: grids an engine stores exactly ("llama.cpp": GGUF's Q4_0, Q8_0)
PRESETS = {"llama.cpp": dict(bits=(4, 8), group_size=32, symmetric=True)}


def allocation_grid(m: int, n: int, floor: Floor, spectral: bool = False) -> list[QuantConfig]:
    preset = PRESETS.get(floor.preset) if floor.preset else None
    if preset is not None:
        fixed = dict(group_size=preset["group_size"], symmetric=preset["symmetric"])
        return [QuantConfig(bits=b, **fixed) for b in preset["bits"] if b >= floor.bits]
    return [QuantConfig(bits=b, group_size=GRID_GROUP) for b in GRID_BITS if b >= floor.bits]


def candidates(mod, dmg, floor: Floor, sigma=None, quick: bool = False) -> list[tuple]:
    m, n = mod.shape
    calib = dmg.calib(mod)
    if calib is None:
        return [
            (c, dmg(mod, mod.weight - compress(mod.weight, c).to_dense().to(mod.weight.dtype)))
            for c in allocation_grid(m, n, floor)
        ]
    factor = hessian_inverse_factor(calib.hessian)  # one for every bit width
    out = []
    for c in allocation_grid(m, n, floor):
        config = QuantConfig(bits=c.bits, group_size=c.group_size, symmetric=c.symmetric, gptq=True)
        codes, scale, zero = ldlq(
            mod.weight.double(),
            calib.hessian,
            config.bits,
            config.group_size,
            factor=factor,
            symmetric=config.symmetric,
        )
        w_hat = dequantize(codes, scale, zero, config.group_size)
        out.append((config, dmg(mod, mod.weight.double() - w_hat)))
    return out


METHOD = Method(
    name="quant",
    config_cls=QuantConfig,
    compress=compress,
    summary="group-wise integer codes (2..8 bits) with a scale and zero point per group; "
    "round-to-nearest or GPTQ",
    paper="",
    data="optional",
    knobs=(
        Knob("bits", "bits per weight", 4, "int", 2, 8),
        Knob("group_size", "input columns sharing one scale and zero point", 128, "int", 1),
        Knob("gptq", "GPTQ error feedback through the calibration Hessian", False, "bool"),
        Knob("act_order", "GPTQ in decreasing diag(H) (default: on with gptq)", None, "bool"),
        Knob("symmetric", "symmetric grid, no zero point stored", False, "bool"),
        Knob(
            "observer",
            "grid choice: minmax or mse (default: mse with gptq)",
            None,
            "choice",
            choices=OBSERVERS,
        ),
        Knob(
            "quantizer",
            "scalar (group-wise grid) or e8p (QuIP#-style, gptq and 2 bits)",
            "scalar",
            "choice",
            choices=QUANTIZERS,
        ),
    ),
    flags=("gptq",),
    columns=("bits",),
    grid=allocation_grid,
    candidates=candidates,
    factorizations=(Quantized, e8p.QuipSharp),
    mixed=True,
    probes={"rtn-3bit": lambda m, n: QuantConfig(bits=3, group_size=128)},
    # a grid is compressed-tensors' own (spectra.export.ctensors checks it fits), and
    # llama.cpp's where it is one of its 32-weight blocks (spectra.export.gguf_out)
    exports={
        "compressed-tensors": lambda f: (
            "E8P lattice codes: no compressed-tensors format"
            if isinstance(f, e8p.QuipSharp)
            else None
        ),
        "gguf": lambda f: gguf_reason(grid_of(f)),
    },
)
