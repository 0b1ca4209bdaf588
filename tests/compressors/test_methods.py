"""Known-answer tests: planted structure is recovered; whitening is optimal in H-norm."""

import pytest
import torch

from compressors.base import Calibration, whitening_factor
from compressors.registry import compress, make_config


def gen(seed):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("random_state", [1, 1234])
def test_lowrank_recovers_planted_rank(random_state):
    g = gen(random_state)
    w = torch.randn(60, 5, generator=g, dtype=torch.float64) @ torch.randn(
        5, 45, generator=g, dtype=torch.float64
    )
    f = compress(w, make_config("lowrank", rank=5))
    assert f.relative_error(w) < 1e-12
    assert compress(w, make_config("lowrank", energy=0.999999)).rank == 5


def test_whitened_energy_rank_is_the_weight_spectrums_as_planned():
    """An energy setting is costed from the weight's spectrum before any calibration:
    the whitened factorization must keep that same rank, not one of W L's spectrum."""
    from spectra.linalg.metrics import energy_rank

    g = gen(3)
    w = torch.randn(40, 30, generator=g, dtype=torch.float64) * torch.logspace(0, -2, 30)
    x = torch.randn(500, 30, generator=g, dtype=torch.float64) * torch.logspace(-2, 1, 30)
    calib = Calibration.from_activations(x)
    planned = energy_rank(torch.linalg.svdvals(w).numpy(), 0.9)
    whitened_spectrum_rank = energy_rank(
        torch.linalg.svdvals(w @ torch.linalg.cholesky(calib.hessian)).numpy(), 0.9
    )
    assert whitened_spectrum_rank != planned  # the case where the two readings differ
    f = compress(w, make_config("lowrank", energy=0.9, whiten=True), calib)
    assert f.rank == planned


@pytest.mark.parametrize("random_state", [1, 1234])
def test_losparse_recovers_low_rank_plus_sparse(random_state):
    g = gen(random_state)
    m, n, r = 80, 70, 3
    low = torch.randn(m, r, generator=g, dtype=torch.float64) @ torch.randn(
        r, n, generator=g, dtype=torch.float64
    )
    spikes = torch.zeros(m * n, dtype=torch.float64)
    idx = torch.randperm(m * n, generator=g)[: int(0.01 * m * n)]
    spikes[idx] = 20 * torch.sign(torch.randn(idx.numel(), generator=g, dtype=torch.float64))
    w = low + spikes.reshape(m, n)
    init = compress(w, make_config("losparse", rank=r, sparsity=0.99))
    refined = compress(w, make_config("losparse", rank=r, sparsity=0.99, iters=30))
    assert refined.relative_error(w) < 1e-8 < init.relative_error(w)
    lowrank_only = compress(w, make_config("lowrank", rank=r))
    assert refined.relative_error(w) < lowrank_only.relative_error(w)


def test_losparse_rows_keeps_whole_rows():
    g = gen(3)
    w = torch.randn(30, 20, generator=g)
    f = compress(w, make_config("losparse", rank=2, sparsity=0.8, structured="rows"))
    assert f.rows.numel() == 6 and f.row_values.shape == (6, 20)
    assert f.n_params == 2 * 50 + 6 * 20 and f.bits == 16 * (2 * 50 + 6 * 20) + 32 * 6
    x = torch.randn(4, 20)
    torch.testing.assert_close(f.as_module()(x), x @ f.to_dense().T, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("random_state", [1, 1234])
def test_mpo_recovers_planted_tt_rank(random_state, planted):
    w, *_ = planted(random_state)
    w = torch.from_numpy(w)
    f = compress(w, make_config("mpo", cores=3, bond_dim=3))
    assert f.relative_error(w) < 1e-10
    assert [c.shape[3] for c in f.cores[:-1]] == [3, 3]  # capped at bond_dim, exact anyway


def test_quant_is_exact_on_its_own_grid():
    g = gen(5)
    codes = torch.randint(0, 16, (12, 32), generator=g).double()
    codes[:, ::8] = 0  # every group of 8 spans the full grid 0..15
    codes[:, 1::8] = 15
    # scales a 16-bit format stores (every grid's scales are float16 values)
    scale = (torch.rand(12, 4, generator=g, dtype=torch.float64) + 0.1).half().double()
    zero = torch.full((12, 4), 5.0, dtype=torch.float64)
    per_col = torch.arange(32) // 8
    w = (codes - zero[:, per_col]) * scale[:, per_col]
    f = compress(w, make_config("quant", bits=4, group_size=8))
    assert f.relative_error(w) < 1e-12


def test_prune_keeps_exactly_the_planted_support():
    g = gen(6)
    w = torch.randn(20, 30, generator=g) * (torch.rand(20, 30, generator=g) < 0.25)
    density = float((w != 0).float().mean())
    f = compress(w, make_config("prune", sparsity=1 - density))
    assert f.relative_error(w) == 0.0 and f.n_params == int((w != 0).sum())


def h_error(w, w_hat, h):
    d = (w - w_hat).double()
    return float(torch.sqrt(torch.trace(d @ h @ d.T)))


@pytest.mark.parametrize("random_state", [1, 1234])
def test_whitened_lowrank_is_optimal_in_the_activation_norm(random_state):
    g = gen(random_state)
    n = 24
    x = torch.randn(400, n, generator=g, dtype=torch.float64) * torch.logspace(1, -1, n)
    calib = Calibration.from_activations(x)
    w = torch.randn(30, n, generator=g, dtype=torch.float64)
    cfg, plain = make_config("lowrank", rank=6, whiten=True), make_config("lowrank", rank=6)
    white = compress(w, cfg, calib)
    e_white = h_error(w, white.to_dense(), calib.hessian)
    e_plain = h_error(w, compress(w, plain).to_dense(), calib.hessian)
    assert e_white < e_plain
    # the optimum: tail singular values of W L with H = L L^T
    s = torch.linalg.svdvals(w @ torch.linalg.cholesky(calib.hessian))
    assert e_white == pytest.approx(float(torch.sqrt((s[6:] ** 2).sum())), rel=1e-8)


def test_whitening_falls_back_to_jitter_when_h_is_singular():
    g = gen(7)
    x = torch.randn(5, 16, generator=g, dtype=torch.float64)  # 5 tokens: H has rank 5
    h = Calibration.from_activations(x).hessian
    chol = whitening_factor("lowrank", Calibration(h, 5))
    added = chol @ chol.T - h  # the jitter: a positive multiple of the identity
    jitter = float(added.diagonal().mean())
    assert jitter > 0 and torch.isfinite(chol).all()
    torch.testing.assert_close(added, jitter * torch.eye(16, dtype=h.dtype), atol=1e-9, rtol=0)
    w = torch.randn(10, 16, generator=g, dtype=torch.float64)
    f = compress(w, make_config("lowrank", rank=4, whiten=True), Calibration.from_activations(x))
    assert torch.isfinite(f.to_dense()).all()


def test_whitening_without_calibration_is_an_input_error():
    from compressors.base import ConfigError

    with pytest.raises(ConfigError, match="calibration"):
        compress(torch.randn(8, 6), make_config("lowrank", rank=2, whiten=True))


def anisotropic_calibration(seed, n=64, tokens=2000):
    g = gen(seed)
    scales = torch.logspace(1, -1, n, dtype=torch.float64)[torch.randperm(n, generator=g)]
    x = torch.randn(tokens, n, generator=g, dtype=torch.float64) * scales
    mix = torch.eye(n, dtype=torch.float64) + 0.3 * torch.randn(
        n, n, generator=g, dtype=torch.float64
    )
    return Calibration.from_activations(x @ mix)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_gptq_beats_rtn_in_the_activation_norm(bits):
    calib = anisotropic_calibration(bits)
    w = torch.randn(48, 64, generator=gen(10 + bits), dtype=torch.float64)
    rtn = compress(w, make_config("quant", bits=bits, group_size=16))
    gptq = compress(w, make_config("quant", bits=bits, group_size=16, gptq=True), calib)
    e_rtn = h_error(w, rtn.to_dense(), calib.hessian)
    e_gptq = h_error(w, gptq.to_dense(), calib.hessian)
    assert e_gptq < 0.9 * e_rtn, (e_gptq, e_rtn)
    assert gptq.bits == rtn.bits  # same storage: only the codes differ
    assert int(gptq.codes.max()) <= 2**bits - 1


def test_gptq_block_size_does_not_change_the_result():
    from compressors.gptq import ldlq

    calib = anisotropic_calibration(0, n=40)
    w = torch.randn(8, 40, generator=gen(1), dtype=torch.float64)
    a = ldlq(w, calib.hessian, 3, 8, block=128)
    b = ldlq(w, calib.hessian, 3, 8, block=7)  # rounded up to one group of 8
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y)


def test_wanda_beats_magnitude_on_outlier_features():
    calib = anisotropic_calibration(3)
    w = torch.randn(48, 64, generator=gen(4), dtype=torch.float64)
    mag = compress(w, make_config("prune", sparsity=0.625))
    wanda = compress(w, make_config("prune", sparsity=0.625, wanda=True), calib)
    assert wanda.n_params == mag.n_params == 24 * 48
    assert h_error(w, wanda.to_dense(), calib.hessian) < h_error(w, mag.to_dense(), calib.hessian)
    per_row = (wanda.to_dense() != 0).sum(1)
    assert (per_row == 24).all()  # per-output comparison groups


@pytest.mark.parametrize(
    "method,knobs", [("quant", dict(bits=4, gptq=True)), ("prune", dict(sparsity=0.5, wanda=True))]
)
def test_data_aware_settings_without_calibration_are_input_errors(method, knobs):
    from compressors.base import ConfigError

    with pytest.raises(ConfigError, match="calibration"):
        compress(torch.randn(8, 16), make_config(method, **knobs))


@pytest.mark.parametrize("random_state", [1, 1234])
def test_joint_recovers_a_shared_row_space_with_fewer_parameters(random_state):
    g = gen(random_state)
    n, k, ms = 50, 6, (40, 20, 20)
    c = torch.randn(k, n, generator=g, dtype=torch.float64)  # shared input directions
    ws = [torch.randn(m, k, generator=g, dtype=torch.float64) @ c for m in ms]
    f = compress(ws, make_config("joint", rank=k))
    for i, w in enumerate(ws):
        torch.testing.assert_close(f.member_dense(i), w, atol=1e-10, rtol=0)
    assert f.n_params == k * (n + sum(ms)) < sum(k * (n + m) for m in ms)


def test_joint_members_compute_the_shared_projection_once():
    g = gen(2)
    ws = [torch.randn(m, 16, generator=g) for m in (12, 4, 4)]
    f = compress(ws, make_config("joint", rank=5))
    mods = f.member_modules()
    x = torch.randn(3, 7, 16)
    outs = [mod(x) for mod in mods]
    assert mods[0].shared.computed == 1  # q, k, v of one attention: one V^T x
    for i, y in enumerate(outs):
        torch.testing.assert_close(y, x @ f.member_dense(i).T, atol=1e-5, rtol=1e-5)
    x2 = x.clone()
    mods[1](x2)
    assert mods[0].shared.computed == 2  # a new input is projected again
    x2.mul_(2)  # in-place change of the same tensor must not reuse the stale projection
    torch.testing.assert_close(mods[2](x2), x2 @ f.member_dense(2).T, atol=1e-5, rtol=1e-5)


def test_joint_refuses_members_with_different_inputs():
    from compressors.base import ConfigError

    with pytest.raises(ConfigError, match="same input"):
        compress([torch.randn(4, 8), torch.randn(4, 9)], make_config("joint", rank=2))


@pytest.mark.parametrize("random_state", [1, 1234])
def test_caldera_beats_ldlq_only_and_rtn_at_the_same_backbone_bits(random_state):
    calib = anisotropic_calibration(random_state)
    g = gen(random_state + 7)
    w = torch.randn(96, 64, generator=g, dtype=torch.float64)
    w[torch.randint(0, 96, (4,), generator=g), torch.randint(0, 64, (4,), generator=g)] = 15.0
    cal = compress(w, make_config("caldera", rank=8, bits=2, factor_bits=4, iters=8), calib)
    ldlq = compress(w, make_config("quant", bits=2, group_size=64, gptq=True), calib)
    rtn = compress(w, make_config("quant", bits=2, group_size=64), calib)
    e = {
        k: h_error(w, f.to_dense().double(), calib.hessian)
        for k, f in dict(caldera=cal, ldlq=ldlq, rtn=rtn).items()
    }
    assert e["caldera"] < e["ldlq"] < e["rtn"], e
    # the error it reports is the error of what it returns
    norm = h_error(w, torch.zeros_like(w), calib.hessian)
    assert cal.h_error == pytest.approx(e["caldera"] / norm, rel=1e-6)


@pytest.mark.parametrize("random_state", [11, 12])
def test_caldera_incoherence_and_unquantized_factors(random_state):
    calib = anisotropic_calibration(random_state)
    g = gen(random_state + 1)
    w = torch.randn(96, 64, generator=g, dtype=torch.float64)
    # 3% scattered outliers: too many for the rank-8 part, so Q's grid must cover them
    # unless the rotation spreads them out
    mask = torch.rand(96, 64, generator=g) < 0.03
    w[mask] = 8.0 * torch.sign(torch.randn(int(mask.sum()), generator=g, dtype=torch.float64))
    base = dict(rank=8, bits=2, group_size=64, iters=6)
    rotated = compress(w, make_config("caldera", factor_bits=4, **base), calib)
    plain = compress(w, make_config("caldera", factor_bits=4, incoherence=False, **base), calib)
    assert rotated.h_error < 0.8 * plain.h_error
    full = compress(w, make_config("caldera", factor_bits=16, **base), calib)
    assert full.h_error <= rotated.h_error * 1.02  # 16-bit factors are at least as good
    assert full.bits - rotated.bits == (16 - 4) * 8 * (96 + 64) - 2 * 16 * (96 * 1 + 8 * 1)


def test_caldera_without_calibration_is_an_input_error():
    from compressors.base import ConfigError

    with pytest.raises(ConfigError, match="calibration"):
        compress(torch.randn(16, 8), make_config("caldera", rank=2))


def test_mpo_forward_in_either_direction_equals_the_dense_forward():
    """The contraction starts from whichever end is cheaper: (m, n) and (n, m) of an
    asymmetric factorization take opposite ends, and both give W x."""
    from compressors.mpo import contraction_cost

    g = gen(11)
    directions = set()
    for m, n in ((96, 36), (36, 96)):
        w = torch.randn(m, n, generator=g, dtype=torch.float64)
        f = compress(w, make_config("mpo", cores=3, bond_dim=5))
        module = f.as_module(torch.randn(m, generator=g, dtype=torch.float64))
        forward, backward = contraction_cost(f.cores), contraction_cost(f.cores, reverse=True)
        assert forward != backward
        assert module.reverse == (backward < forward)
        directions.add(module.reverse)
        x = torch.randn(2, 7, n, generator=g, dtype=torch.float64)
        want = x @ f.to_dense().T + module.bias
        torch.testing.assert_close(module(x), want, rtol=1e-10, atol=1e-10)
    assert directions == {True, False}
