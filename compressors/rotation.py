"""Seeded random orthogonal transforms for incoherence processing (QuIP / CALDERA style).

For n = 2^a * b with b odd: R = (H_{2^a} kron O_b) D, with H the normalised Sylvester
Hadamard matrix, O_b a random orthogonal b x b matrix (QR of a Gaussian) and D random
signs. Applying R costs O(n (2^a + b)) and regenerating it needs only (n, seed), so
nothing beyond the seed is stored.
"""

from __future__ import annotations

import torch


class Rotation:
    """A seeded orthogonal n x n transform, applied along the last axis."""

    def __init__(self, n: int, seed: int):
        a = (n & -n).bit_length() - 1  # largest power of two dividing n
        self.n, self.p, self.b = n, 2**a, n >> a
        g = torch.Generator().manual_seed(seed)
        self.signs = torch.randint(0, 2, (n,), generator=g, dtype=torch.float64) * 2 - 1
        q, r = torch.linalg.qr(torch.randn(self.b, self.b, generator=g, dtype=torch.float64))
        self.o = q * torch.sign(torch.diagonal(r))  # Haar-distributed
        h = torch.ones(1, 1, dtype=torch.float64)
        while h.shape[0] < self.p:
            h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)])
        self.h = h / self.p**0.5

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """x R^T along the last axis, i.e. R applied to every row vector of x."""
        lead = x.shape[:-1]
        y = (x * self.signs.to(x)).reshape(*lead, self.p, self.b)
        y = torch.einsum("ij,...jk,lk->...il", self.h.to(x), y, self.o.to(x))
        return y.reshape(*lead, self.n)

    def apply_inverse(self, x: torch.Tensor) -> torch.Tensor:
        """x R along the last axis (R^T applied to every row vector)."""
        lead = x.shape[:-1]
        y = x.reshape(*lead, self.p, self.b)
        y = torch.einsum("ji,...jk,kl->...il", self.h.to(x), y, self.o.to(x))
        return y.reshape(*lead, self.n) * self.signs.to(x)

    def matrix(self) -> torch.Tensor:
        """R itself (n, n)."""
        return self.apply(torch.eye(self.n, dtype=torch.float64)).T


def pair(m: int, n: int, seed: int) -> tuple[Rotation, Rotation]:
    """The (U, V) of an (m, n) weight rotated as W' = U W V^T (seeds seed and seed + 1)."""
    return Rotation(m, seed), Rotation(n, seed + 1)


def unrotate(w: torch.Tensor, rotations: tuple[Rotation, Rotation]) -> torch.Tensor:
    """U^T W' V: a rotated weight back in the original coordinates."""
    u, v = rotations
    return u.apply_inverse(v.apply_inverse(w).T).T
