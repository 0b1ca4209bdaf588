"""MPO bond spectra against explicit unfoldings, tensorly's TT-SVD and planted TT ranks."""

import itertools
import math

import numpy as np
import pytest
import scipy.linalg

from spectra.linalg import mpo


@pytest.mark.parametrize("d,k", [(576, 3), (1536, 3), (49152, 3), (4096, 4), (97, 2), (360, 6)])
def test_factorize_is_the_most_balanced(d, k):
    f = mpo.factorize(d, k)
    assert len(f) == k and math.prod(f) == d and list(f) == sorted(f)
    # brute force over all ordered factorizations: none has a smaller largest factor
    divisors = [x for x in range(1, d + 1) if d % x == 0] if d < 5000 else None
    if divisors:
        best = min(
            max(c)
            for c in itertools.product(divisors, repeat=k - 1)
            if d % math.prod(c) == 0
            for c in [(*c, d // math.prod(c))]
        )
        assert max(f) == best


def explicit_unfolding_svals(w, mf, nf, bond):
    """Interleave (i1 j1)(i2 j2).. with an explicit index loop: independent of mpo.paired."""
    k = len(mf)
    t = np.zeros([a * b for a, b in zip(mf, nf, strict=True)])
    for i in range(w.shape[0]):
        ri = np.unravel_index(i, mf)
        for j in range(w.shape[1]):
            cj = np.unravel_index(j, nf)
            t[tuple(ri[q] * nf[q] + cj[q] for q in range(k))] = w[i, j]
    left = math.prod(a * b for a, b in zip(mf[: bond + 1], nf[: bond + 1], strict=True))
    return scipy.linalg.svdvals(t.reshape(left, -1))


@pytest.mark.parametrize("random_state", [1, 1234])
@pytest.mark.parametrize("shape,k", [((24, 30), 3), ((16, 16), 2), ((32, 48), 4)])
def test_bond_spectra_equal_explicit_unfoldings(shape, k, random_state):
    w = np.random.default_rng(random_state).standard_normal(shape)
    mf, nf = mpo.factorize(shape[0], k), mpo.factorize(shape[1], k)
    spectra = mpo.bond_spectra(w, mf, nf)
    assert [len(s) for s in spectra] == mpo.full_bond_dims(mf, nf)
    for b, s in enumerate(spectra):
        ref = explicit_unfolding_svals(w, mf, nf, b)
        np.testing.assert_allclose(s, ref[: len(s)], rtol=1e-9, atol=1e-12 * ref[0])


@pytest.mark.parametrize("layout", ["float64", "float32", "transposed"])
def test_bond_spectra_from_many_small_blocks(layout, monkeypatch):
    """Bond Grams summed over blocks a few rows long, from float32 and strided input, for
    a wide bond (4 x 180) and a tall one (36 x 20), match the explicit unfoldings."""
    monkeypatch.setattr(mpo, "CHUNK_BYTES", 8 * 100)  # 100 float64s: 6 and 12 blocks
    w = np.random.default_rng(3).standard_normal((24, 30))
    if layout == "float32":
        w = w.astype(np.float32)
    elif layout == "transposed":
        w = np.asfortranarray(w)
    mf, nf = mpo.factorize(24, 3), mpo.factorize(30, 3)
    unfolds = [math.prod(mf[: k + 1]) * math.prod(nf[: k + 1]) for k in range(2)]
    assert unfolds[0] < 720 // unfolds[0] and unfolds[1] > 720 // unfolds[1]  # wide, tall
    blocks = []
    real = mpo.gram_of_blocks
    monkeypatch.setattr(
        mpo, "gram_of_blocks", lambda bs: real(b for b in bs if blocks.append(1) or 1)
    )
    spectra = mpo.bond_spectra(w, mf, nf)
    assert len(blocks) >= 12
    for b, s in enumerate(spectra):
        ref = explicit_unfolding_svals(w.astype(np.float64), mf, nf, b)
        np.testing.assert_allclose(s, ref[: len(s)], rtol=1e-9, atol=1e-12 * ref[0])


@pytest.mark.parametrize("random_state", [1, 1234])
def test_tt_svd_matches_tensorly(random_state):
    tl_decomp = pytest.importorskip("tensorly.decomposition")
    import tensorly as tl

    w = np.random.default_rng(random_state).standard_normal((24, 30))
    mf, nf = mpo.factorize(24, 3), mpo.factorize(30, 3)
    dims = [a * b for a, b in zip(mf, nf, strict=True)]
    tensor = mpo.paired(w[None], mf, nf)[0]
    for ranks in ([4, 6], [2, 3], mpo.full_bond_dims(mf, nf)):
        ours = mpo.tt_svd(w, mf, nf, ranks=ranks)
        tt = tl_decomp.tensor_train(tl.tensor(tensor), rank=[1, *ranks, 1])
        theirs = tl.tt_to_tensor(tt)
        mine = mpo.paired(mpo.tt_to_dense(ours)[None], mf, nf)[0]
        np.testing.assert_allclose(mine, theirs, atol=1e-10)
        # the same algorithm in torch (the compressor's path, on the weight's device)
        import torch

        on_torch = mpo.tt_svd(torch.from_numpy(w), mf, nf, ranks=ranks)
        assert all(torch.is_tensor(c) for c in on_torch)
        dense = mpo.tt_to_dense(on_torch)
        np.testing.assert_allclose(mpo.paired(dense.numpy()[None], mf, nf)[0], theirs, atol=1e-10)
        assert [c.shape for c in ours] == [
            (r0, m, n, r1) for r0, m, n, r1 in zip([1, *ranks], mf, nf, [*ranks, 1], strict=True)
        ]
        assert dims == list(tensor.shape)
    exact = mpo.tt_to_dense(mpo.tt_svd(w, mf, nf))
    np.testing.assert_allclose(exact, w, atol=1e-12)


@pytest.mark.parametrize("random_state", [1, 1234])
def test_planted_tt_rank_is_recovered(random_state, planted):
    w, mf, nf, ranks = planted(random_state)
    spectra = mpo.bond_spectra(w, mf, nf)
    for s, rk in zip(spectra, ranks, strict=True):
        assert np.all(s[:rk] > 1e-6 * s[0]) and np.all(s[rk:] < 1e-10 * s[0])
    assert mpo.chi_for_eps(spectra, 1e-8) == ranks
    rebuilt = mpo.tt_to_dense(mpo.tt_svd(w, mf, nf, eps=1e-8))
    np.testing.assert_allclose(rebuilt, w, atol=1e-9 * np.abs(w).max())


def test_planted_tt_rank_from_blocks_falls_back_to_the_unfolding_svd(planted, monkeypatch):
    """A rank-deficient bond (spectrum below the Gram floor) is recomputed by SVD."""
    monkeypatch.setattr(mpo, "CHUNK_BYTES", 8 * 64)
    w, mf, nf, ranks = planted(7)
    spectra = mpo.bond_spectra(w, mf, nf)
    for s, rk in zip(spectra, ranks, strict=True):
        assert np.all(s[:rk] > 1e-6 * s[0]) and np.all(s[rk:] < 1e-10 * s[0])


@pytest.mark.parametrize("eps", [0.02, 0.1, 0.3, 0.6])
@pytest.mark.parametrize("k", [2, 3, 4])
def test_truncation_at_chi_eps_meets_eps(eps, k):
    rng = np.random.default_rng(5)
    w = rng.standard_normal((64, 48)) @ np.diag(np.geomspace(1, 1e-2, 48))
    mf, nf = mpo.factorize(64, k), mpo.factorize(48, k)
    spectra = mpo.bond_spectra(w, mf, nf)
    chi = mpo.chi_for_eps(spectra, eps)
    rebuilt = mpo.tt_to_dense(mpo.tt_svd(w, mf, nf, ranks=chi))
    assert np.linalg.norm(rebuilt - w) / np.linalg.norm(w) <= eps
    # each chi is the smallest meeting the per-bond tolerance eps / sqrt(K - 1)
    for s, c in zip(spectra, chi, strict=True):
        if c > 0:
            tail = math.sqrt((s[c - 1 :] ** 2).sum() / (s**2).sum())
            assert tail > eps / math.sqrt(k - 1)


def test_params_and_chi_for_ratio():
    mf, nf = (8, 8, 9), (8, 8, 9)
    assert mpo.full_bond_dims(mf, nf) == [64, 81]
    assert mpo.mpo_params(mf, nf, [10, 20]) == 1 * 64 * 10 + 10 * 64 * 20 + 20 * 81 * 1
    assert mpo.params_at_chi(mf, nf, 1000) == 64 * 64 + 64 * 64 * 81 + 81 * 81
    for ratio in (0.01, 0.1, 0.5):
        chi = mpo.chi_for_ratio(mf, nf, ratio)
        budget = ratio * 576 * 576
        assert mpo.params_at_chi(mf, nf, chi) <= budget < mpo.params_at_chi(mf, nf, chi + 1)


def test_entropy():
    assert mpo.entropy(np.ones(8)) == pytest.approx(math.log(8))
    assert mpo.entropy(np.array([3.0, 0, 0])) == pytest.approx(0.0)


@pytest.mark.parametrize("k", [1, 7, 9])
def test_bad_core_counts_are_input_errors(k):
    from spectra.errors import SpectraInputError

    with pytest.raises(SpectraInputError, match="cores"):
        mpo.check_cores(k)
