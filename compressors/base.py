"""The contract every compressor keeps.

A method module holds a frozen `XxxConfig` that validates itself in `__post_init__`
and a pure `compress(weight, config, calib=None) -> Factorization` that never
modifies `weight` ((out, in), any float dtype). A Factorization knows its dense
reconstruction, its parameter count, the storage it needs in bits (scales, zero
points and sparse indices included) and how to become an nn.Module whose forward
uses the compact form.

Storage convention: unquantized parameters (dense weights, low-rank factors, MPO
cores, sparse values) count DENSE_BITS = 16 bits each, as they would be stored in
fp16/bf16; quantized codes count their bit width, their scales and zero points 16
bits each.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import nn

from spectra.errors import SpectraInputError

DENSE_BITS = 16
JITTERS = (0.0, 1e-8, 1e-6, 1e-4, 1e-2, 1e-1)  # of H's mean diagonal, tried in turn
DAMP = 0.01  # GPTQ's percdamp: this fraction of mean(diag H) is added to the diagonal


class ConfigError(SpectraInputError):
    """A compressor setting that the method does not accept; names field and value."""


def config_error(method: str, field: str, value, why: str) -> ConfigError:
    return ConfigError(f"{method}: {field}={value!r}: {why}")


def require_int(method: str, field: str, value, minimum: int) -> None:
    """An integer setting at least `minimum`, or a ConfigError naming it."""
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise config_error(method, field, value, f"must be an integer >= {minimum}")


def check_rank(method: str, rank: int, m: int, n: int) -> None:
    """A rank that an (m, n) matrix can have, or a ConfigError naming it."""
    if rank > min(m, n):
        raise config_error(method, "rank", rank, f"above min(m, n) = {min(m, n)}")


class Factorization:
    """Compact form of one weight matrix (out, in)."""

    shape: tuple[int, int]

    def to_dense(self) -> torch.Tensor:
        raise NotImplementedError

    @property
    def n_params(self) -> int:
        raise NotImplementedError

    @property
    def bits(self) -> int:
        raise NotImplementedError

    def as_module(self, bias: torch.Tensor | None = None) -> nn.Module:
        raise NotImplementedError

    def relative_error(self, weight: torch.Tensor) -> float:
        """||W - W_hat||_F / ||W||_F, in float64."""
        return relative_error(weight, self.to_dense())


def relative_error(w: torch.Tensor, w_hat: torch.Tensor) -> float:
    """||W - W_hat||_F / ||W||_F, in float64."""
    w = w.detach().to(torch.float64)
    return float(torch.linalg.norm(w - w_hat.to(torch.float64)) / torch.linalg.norm(w))


def h_norm(e: torch.Tensor, h: torch.Tensor) -> float:
    """sqrt(tr(E H E^T)) = ||E X^T||_F for H = X^T X: the calibration-weighted norm."""
    e = e.to(torch.float64)
    h = h.to(device=e.device, dtype=torch.float64)
    return float(torch.sqrt(torch.clamp(torch.einsum("ij,jk,ik->", e, h, e), min=0)))


def config_to_dict(config) -> dict:
    """Plain dict of a config (for YAML/JSON), method name first."""
    return {"method": config.method, **dataclasses.asdict(config)}


def csr_index_bits(rows: int, cols: int, nnz: int) -> int:
    """Bits of CSR indices: a ceil(log2 cols)-bit column index per value, 32-bit row pointers."""
    return nnz * max(1, math.ceil(math.log2(max(cols, 2)))) + 32 * (rows + 1)


@dataclass(frozen=True)
class Calibration:
    """What data-aware methods need from the activations X (tokens, in) entering a module.

    Attributes:
        hessian: H = X^T X, (in, in), float64.
        count: number of token rows accumulated into H.
    """

    hessian: torch.Tensor
    count: int

    @property
    def col_norms(self) -> torch.Tensor:
        """||X[:, j]||_2 per input feature (what Wanda scales |W| by)."""
        return torch.sqrt(torch.clamp(torch.diagonal(self.hessian), min=0))

    @staticmethod
    def from_activations(x: torch.Tensor) -> Calibration:
        x = x.reshape(-1, x.shape[-1]).to(torch.float64)
        return Calibration(hessian=x.T @ x, count=x.shape[0])


def whitening_factor(method: str, calib: Calibration | None) -> torch.Tensor:
    """Lower Cholesky factor L (float64) of the calibration Gram H = X^T X, so that
    ||E X^T||_F = ||E L||_F: the whitening of every `whiten: true` method.

    When H is not positive definite (dead or collinear inputs), the smallest multiple
    of its mean diagonal in JITTERS that makes it so is added.
    """
    if calib is None:
        raise config_error(method, "whiten", True, "needs calibration data")
    # one float64 copy of H whose diagonal takes the jitter, and the factor: two n x n
    # matrices (an 8B model's down_proj: 1.6 GB each), never an identity beside them
    h = calib.hessian.to(torch.float64)
    if h is calib.hessian:
        h = h.clone()
    diag = torch.diagonal(h)
    base = diag.clone()
    scale = float(base.mean().clamp_min(1e-30))
    for jitter in JITTERS:
        diag.copy_(base + jitter * scale)
        chol, info = torch.linalg.cholesky_ex(h)
        if int(info) == 0:
            return chol
        del chol
    raise config_error(method, "whiten", True, "calibration Gram is not positive definite")


def hessian_inverse_factor(h: torch.Tensor, damp: float = DAMP, perm: torch.Tensor | None = None):
    """(upper Cholesky factor of (H + damp * mean diag)^-1, mask of dead input columns),
    with H's columns and rows in the order `perm` when given (act_order)."""
    wide = h.to(torch.float64)  # a copy unless h is float64 already
    if perm is not None:
        rows = wide[perm]
        del wide
        h = rows[:, perm]
        del rows
    else:
        h = wide.clone() if wide is h else wide
        del wide
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    torch.diagonal(h).add_(damp * torch.diagonal(h).mean())
    # two n x n matrices alive at a time (down_proj of an 8B model: 1.6 GB each)
    low = torch.linalg.cholesky(h)
    del h
    inv = torch.cholesky_inverse(low)
    del low
    return torch.linalg.cholesky(inv, upper=True), dead
