"""Singular values against an independent float64 reference (scipy's gesvd)."""

import numpy as np
import pytest
import scipy.linalg

from spectra.io.model import open_model
from spectra.linalg import svd
from spectra.linalg.svd import singular_values, singular_values_torch


def reference(w):
    return scipy.linalg.svd(np.asarray(w, np.float64), compute_uv=False, lapack_driver="gesvd")


def assert_spectrum_close(s, ref):
    """Every sigma above 1e-6 * sigma_max within 1e-4 relative (DESIGN accuracy target)."""
    assert s.shape == ref.shape
    keep = ref > 1e-6 * ref[0]
    rel = np.abs(s[keep] - ref[keep]) / ref[keep]
    assert rel.max() < 1e-4, f"worst relative error {rel.max():.2e}"
    assert np.all(np.diff(s) <= 0), "not descending"


def planted(rng, m, n, r):
    return rng.standard_normal((m, r)) @ rng.standard_normal((r, n))


def ill_conditioned(rng, m, n, decades):
    u, _ = np.linalg.qr(rng.standard_normal((m, min(m, n))))
    v, _ = np.linalg.qr(rng.standard_normal((n, min(m, n))))
    s = np.logspace(0, -decades, min(m, n))
    return (u * s) @ v.T


@pytest.mark.parametrize("random_state", [1, 1234])
@pytest.mark.parametrize(
    "make",
    [
        lambda rng: rng.standard_normal((200, 80)),  # tall
        lambda rng: rng.standard_normal((60, 150)),  # wide
        lambda rng: rng.standard_normal((97, 97)),  # square
        lambda rng: planted(rng, 120, 90, 7),  # exactly rank 7
        lambda rng: ill_conditioned(rng, 150, 100, 5),  # sigma down to 1e-5 sigma_max
        lambda rng: ill_conditioned(rng, 100, 150, 8),  # down to 1e-8: needs the SVD fallback
        lambda rng: rng.standard_normal((300, 40)).astype(np.float32),  # float32 input
    ],
    ids=["tall", "wide", "square", "rank7", "cond1e5", "cond1e8", "float32"],
)
def test_matches_float64_svd(make, random_state):
    w = make(np.random.default_rng(random_state))
    assert_spectrum_close(singular_values(w), reference(w))


@pytest.mark.parametrize(
    "make",
    [
        lambda rng: rng.standard_normal((300, 40)).astype(np.float32),
        lambda rng: rng.standard_normal((40, 300)).astype(np.float32),
        lambda rng: np.asfortranarray(rng.standard_normal((300, 40))).T[:, ::2],
        lambda rng: ill_conditioned(rng, 200, 50, 8).astype(np.float32),
    ],
    ids=["tall-f32", "wide-f32", "strided", "cond1e8-f32"],
)
def test_gram_summed_from_blocks(make, monkeypatch):
    """Input that is not contiguous float64 is widened block by block (7 rows here)."""
    monkeypatch.setattr(svd, "CHUNK_BYTES", 8 * 40 * 7)
    w = make(np.random.default_rng(9))
    blocks = []
    real = svd.gram_of_blocks
    monkeypatch.setattr(
        svd, "gram_of_blocks", lambda bs: real(b for b in bs if blocks.append(b.shape) or 1)
    )
    assert_spectrum_close(singular_values(w), reference(w))
    assert len(blocks) > 5 and all(b[0] <= 7 for b in blocks)


def test_planted_rank_has_exactly_r_nonzero():
    w = planted(np.random.default_rng(0), 80, 60, 5)
    s = singular_values(w)
    assert np.all(s[:5] > 1e-3 * s[0]) and np.all(s[5:] < 1e-10 * s[0])


def test_torch_batched_path_agrees_with_numpy():
    import torch

    rng = np.random.default_rng(3)
    batch = np.stack([rng.standard_normal((70, 50)), ill_conditioned(rng, 70, 50, 9)])
    s = singular_values_torch(torch.from_numpy(batch)).numpy()
    for i in range(2):
        assert_spectrum_close(s[i], reference(batch[i]))


@pytest.mark.demo
def test_demo_matrices(demo_dir):

    mats = {m.name: m for m in open_model(str(demo_dir)).matrices}
    for name in [
        "model.layers.0.self_attn.o_proj",
        "model.layers.5.self_attn.k_proj",
        "model.layers.29.mlp.down_proj",
        "model.layers.12.mlp.gate_proj",
    ]:
        w = mats[name].read(np.float64)
        assert_spectrum_close(singular_values(w), reference(w))
