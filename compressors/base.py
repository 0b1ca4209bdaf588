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
from typing import ClassVar

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
    """Compact form of one weight matrix (out, in), or of a group's (see `members`).

    Healing (compressors.healing) asks each factorization what it trains: nothing
    unless `healable`; then the float tensors of its module (`train`), its quantized
    stored factors taken to float for the purpose (`float_factors`) and put back on
    their grids after (`refold`). compressors.factors.QuantizedFactors serves every
    factorization whose quantized parts are QuantizedFactor fields (or lists of them).
    """

    shape: tuple[int, int]
    healable: ClassVar[bool] = False  # healing trains its float parts

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

    @property
    def members(self) -> int:
        """How many modules this one factorization stands for (a group's: joint's q, k, v
        share one); they are its members 0..members-1, in the order they were given."""
        return 1

    def member_dense(self, i: int) -> torch.Tensor:
        """Member `i`'s reconstructed (out, in) weight."""
        return self.to_dense()

    def member_modules(self, biases: list | None = None) -> list[nn.Module]:
        """One compact module per member (a group's share what they share)."""
        return [self.as_module(biases[0] if biases else None)]

    def relative_error(self, weight: torch.Tensor) -> float:
        """||W - W_hat||_F / ||W||_F, in float64."""
        return relative_error(weight, self.to_dense())

    # healing: what it trains, and how its quantized factors go and come back

    def float_factors(self) -> dict:
        """Replace every quantized stored factor by its float value, to be trained;
        returns {(field, index or None): the quantized factor} to `refold` with (none
        by default; compressors.factors.QuantizedFactors: its QuantizedFactor fields)."""
        return {}

    def trained(self, key: tuple) -> torch.Tensor:
        """The float tensor that training updates at `key` (of `float_factors`)."""
        name, i = key
        return getattr(self, name) if i is None else getattr(self, name)[i]

    def refold(self, key: tuple, old) -> None:
        """Put the trained tensor at `key` back on the grid of `old`, round-to-nearest."""
        name, i = key
        value = self.on_grid(self.trained(key).detach(), old)
        if i is None:
            setattr(self, name, value)
        else:
            getattr(self, name)[i] = value

    def on_grid(self, value: torch.Tensor, old):
        """`value` quantized on the grid of `old` (a factor `float_factors` took)."""
        raise NotImplementedError

    def train(self, module: nn.Module) -> None:
        """Give `module` (built from this factorization) its training form, in place:
        by default every parameter but biases trains."""
        for pname, p in module.named_parameters():
            if pname != "bias" and not pname.endswith(".bias"):
                p.requires_grad_(True)


def units(factorizations: dict) -> list[tuple[list[str], Factorization]]:
    """[(member names, factorization)] of {module name: factorization}: the names one
    factorization stands for (a group's members, in order), each factorization once."""
    by_id: dict[int, tuple[list[str], Factorization]] = {}  # all alive: ids are unique
    for name, f in factorizations.items():
        by_id.setdefault(id(f), ([], f))[0].append(name)
    return list(by_id.values())


BAND = 2048  # rows or columns widened to float64 at a time by the error norms below


def relative_error(w: torch.Tensor, w_hat: torch.Tensor) -> float:
    """||W - W_hat||_F / ||W||_F, in float64 (a band of rows at a time: an 8B model's
    down_proj is 0.47 GB a copy in float64)."""
    num = den = 0.0
    for r0 in range(0, w.shape[0], BAND):
        rows = w[r0 : r0 + BAND].detach().to(torch.float64, copy=True)
        den += float(rows.square().sum())
        num += float(rows.sub_(w_hat[r0 : r0 + BAND]).square_().sum())
    return math.sqrt(num) / math.sqrt(den)


def h_norm(e: torch.Tensor, h: torch.Tensor) -> float:
    """sqrt(tr(E H E^T)) = ||E X^T||_F for H = X^T X: the calibration-weighted norm, in
    float64 a band of H's columns at a time (never a float64 copy of H, 1.6 GB for an
    8B model's down_proj)."""
    e = e.detach().to(torch.float64)
    total = 0.0
    for c0 in range(0, h.shape[1], BAND):
        band = h[:, c0 : c0 + BAND].to(device=e.device, dtype=torch.float64)
        total += float((e @ band).mul_(e[:, c0 : c0 + BAND]).sum())
    return math.sqrt(max(total, 0.0))


def h_relative_error(w: torch.Tensor, w_hat: torch.Tensor, h: torch.Tensor) -> float | None:
    """||(W - W_hat) X^T||_F / ||W X^T||_F for H = X^T X (None when W X^T is 0), with
    one float64 copy of W."""
    den = h_norm(w, h)
    if not den:
        return None
    return h_norm(w.detach().to(torch.float64, copy=True).sub_(w_hat), h) / den


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
    # one float64 copy of H whose diagonal takes the jitter, factored in its own memory
    # on the CPU (an 8B model's down_proj: 1.6 GB); torch's factor is a second matrix
    on_cpu = calib.hessian.device.type == "cpu"
    h = None
    for jitter in JITTERS:
        if h is None:  # LAPACK left a failed attempt's partial factor in it: afresh
            h = _wide_copy(calib.hessian)
            scale = float(torch.diagonal(h).mean().clamp_min(1e-30))
            base = torch.diagonal(h).clone()
        torch.diagonal(h).copy_(base + jitter * scale)
        if on_cpu:
            if _cholesky_in_place(h):
                return h
            h = None
            continue
        chol, info = torch.linalg.cholesky_ex(h)
        if int(info) == 0:
            return chol
        del chol
    raise config_error(method, "whiten", True, "calibration Gram is not positive definite")


def hessian_inverse_factor(h: torch.Tensor, damp: float = DAMP, perm: torch.Tensor | None = None):
    """(upper Cholesky factor of (H + damp * mean diag)^-1, mask of dead input columns),
    with H's columns and rows in the order `perm` when given (act_order)."""
    if perm is None:
        h = _wide_copy(h)
    else:  # widened and permuted a band of rows at a time: one n x n float64, no more
        perm = perm.to(h.device)
        wide = torch.empty(h.shape, dtype=torch.float64, device=h.device)
        for r0 in range(0, len(perm), BAND):
            wide[r0 : r0 + BAND] = h[perm[r0 : r0 + BAND]][:, perm]
        h = wide
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    torch.diagonal(h).add_(damp * torch.diagonal(h).mean())
    if h.device.type == "cpu":
        return _inverse_factor_in_place(h), dead
    # on a GPU, two n x n matrices alive at a time (torch factors a copy); the inverse
    # overwrites the factor
    low = torch.linalg.cholesky(h)
    del h
    torch.cholesky_inverse(low, out=low)
    return torch.linalg.cholesky(low, upper=True), dead


def _wide_copy(h: torch.Tensor) -> torch.Tensor:
    """A C-contiguous float64 copy of `h`, whatever its dtype and strides."""
    return torch.empty(h.shape, dtype=torch.float64, device=h.device).copy_(h)


def _in_place(step: str, f, run) -> int:
    """LAPACK's info of `run(f)`, which must overwrite the Fortran array f (never half
    in place: a copy would leave f as it was)."""
    out, info = run(f)
    if out.ctypes.data != f.ctypes.data:
        raise RuntimeError(f"LAPACK {step} copied its input")
    return int(info)


def _cholesky_in_place(h: torch.Tensor) -> bool:
    """Overwrite the symmetric float64 CPU `h` with its lower Cholesky factor (LAPACK's
    potrf on the same memory); False, with h spoilt, when h is not positive definite.

    h is C-ordered: its transpose, the same memory and the same matrix, is the Fortran
    array LAPACK factors as U^T U; U^T, the lower factor, lies in h's lower triangle."""
    from scipy.linalg import lapack

    f = h.numpy().T
    info = _in_place("potrf", f, lambda a: lapack.dpotrf(a, lower=0, clean=0, overwrite_a=1))
    if info != 0:
        return False
    h.tril_()  # the strict upper triangle still holds H
    return True


def _inverse_factor_in_place(h: torch.Tensor) -> torch.Tensor:
    """The upper Cholesky factor of h^-1 for a symmetric positive definite float64 CPU
    `h`, computed in h's own memory: LAPACK's potrf, potri, potrf in place, so a
    factor costs one n x n matrix (an 8B model's down_proj: 1.6 GB), not torch's two.

    h is C-ordered; its transpose (the same memory, the same matrix) is the Fortran
    array LAPACK overwrites. The lower factor of h^-1 in Fortran order is the upper
    factor U (h^-1 = U^T U) in C order."""
    from scipy.linalg import lapack

    f = h.numpy().T  # Fortran-contiguous: LAPACK works in place
    for step, run in (
        ("potrf", lambda a: lapack.dpotrf(a, lower=1, clean=0, overwrite_a=1)),
        ("potri", lambda a: lapack.dpotri(a, lower=1, overwrite_c=1)),
        ("potrf", lambda a: lapack.dpotrf(a, lower=1, clean=0, overwrite_a=1)),
    ):
        info = _in_place(step, f, run)
        if info != 0:
            raise torch.linalg.LinAlgError(
                f"{step} failed (info {info}): H is not positive definite"
            )
    return h.triu_()  # the strict lower triangle holds what potri left there
