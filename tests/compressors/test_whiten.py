"""`whiten: true` for joint, losparse and mpo: known answers on planted structure, and
a lower calibration-weighted error than the data-free form at equal cost on demo
matrices with the demo's own activations."""

import numpy as np
import pytest
import torch

from compressors.base import Calibration, h_norm
from compressors.registry import compress, make_config


def gen(seed):
    return torch.Generator().manual_seed(seed)


def anisotropic(tokens, n, seed, low=-2, high=1):
    """Activations whose channels differ in scale by 10^(high - low)."""
    g = gen(seed)
    mix = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))[0]
    return (
        torch.randn(tokens, n, generator=g, dtype=torch.float64) * torch.logspace(low, high, n)
    ) @ mix


def rel_h(w, f, calib, member=None):
    d = f.to_dense() if member is None else f.member_dense(member)
    return h_norm(w - d.double(), calib.hessian) / h_norm(w, calib.hessian)


def test_whitened_joint_with_one_member_is_whitened_lowrank():
    g = gen(0)
    w = torch.randn(24, 32, generator=g, dtype=torch.float64)
    calib = Calibration.from_activations(anisotropic(400, 32, 1))
    joint = compress([w], make_config("joint", rank=7, whiten=True), calib)
    low = compress(w, make_config("lowrank", rank=7, whiten=True), calib)
    torch.testing.assert_close(joint.to_dense(), low.to_dense(), rtol=1e-9, atol=1e-9)


def test_whitened_joint_recovers_a_basis_planted_in_activation_space():
    """W_i = A_i Q^T + N_i P^T: a shared rank-k map of input directions Q that X
    excites, plus ten times larger weights on directions P that X almost never
    excites. The data-free basis chases the large weights; the whitened one finds Q."""
    n, k, busy = 40, 5, 20
    g = gen(2)
    e = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))[0]
    scale = torch.cat([torch.ones(busy), torch.full((n - busy,), 1e-5)]).double()
    x = (torch.randn(3000, n, generator=g, dtype=torch.float64) * scale) @ e.T
    calib = Calibration.from_activations(x)
    mix = torch.linalg.qr(torch.randn(busy, k, generator=g, dtype=torch.float64))[0]
    q, p = e[:, :busy] @ mix, e[:, busy : busy + k]
    members = [
        torch.randn(m, k, generator=g, dtype=torch.float64) @ q.T
        + 10 * torch.randn(m, k, generator=g, dtype=torch.float64) @ p.T
        for m in (16, 24, 24)
    ]
    white = compress(members, make_config("joint", rank=k, whiten=True), calib)
    plain = compress(members, make_config("joint", rank=k), calib)
    for i, w in enumerate(members):
        assert rel_h(w, white, calib, i) < 1e-3
        assert rel_h(w, plain, calib, i) > 0.5


@pytest.mark.parametrize("structured", ["none", "rows"])
@pytest.mark.parametrize("iters", [0, 3])
def test_whitened_losparse_beats_the_plain_form_in_the_activation_norm(structured, iters):
    x = anisotropic(2000, 40, 4, low=-3, high=1)
    calib = Calibration.from_activations(x)
    w = torch.randn(30, 40, generator=gen(5), dtype=torch.float64)
    knobs = dict(rank=6, sparsity=0.9, structured=structured, iters=iters)
    white = compress(w, make_config("losparse", whiten=True, **knobs), calib)
    plain = compress(w, make_config("losparse", **knobs))
    assert white.n_params == plain.n_params
    assert rel_h(w, white, calib) < 0.9 * rel_h(w, plain, calib)
    # the alternation keeps its best iterate: never worse than the whitened init
    init = compress(w, make_config("losparse", whiten=True, **{**knobs, "iters": 0}), calib)
    assert rel_h(w, white, calib) <= rel_h(w, init, calib) + 1e-12


def test_whitened_mpo_scales_inputs_and_costs_n_more():
    from compressors.mpo import MPOLinear

    n = 48
    x = anisotropic(1000, n, 5, low=-3, high=1) @ torch.diag(
        torch.logspace(-2, 1, n, dtype=torch.float64)
    )
    calib = Calibration.from_activations(x)
    w = torch.randn(36, n, generator=gen(6), dtype=torch.float64)
    cfg = make_config("mpo", cores=2, bond_dim=4, whiten=True)
    f = compress(w, cfg, calib)
    assert f.scale is not None and f.scale.shape == (n,)
    assert (
        cfg.cost(36, n)[0]
        == f.n_params
        == make_config("mpo", cores=2, bond_dim=4).cost(36, n)[0] + n
    )
    plain = compress(w, make_config("mpo", cores=2, bond_dim=4))
    assert rel_h(w, f, calib) < rel_h(w, plain, calib)
    xs = torch.randn(3, n, dtype=torch.float64)
    module = f.as_module()
    assert isinstance(module, MPOLinear)
    torch.testing.assert_close(module(xs), xs @ f.to_dense().T, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(
    ("method", "members", "knobs"),
    [
        ("lowrank", ["o_proj"], dict(rank=96)),
        ("joint", ["q_proj", "k_proj", "v_proj"], dict(rank=128)),
        ("losparse", ["up_proj"], dict(rank=64, sparsity=0.95, iters=2)),
        ("mpo", ["down_proj"], dict(cores=3, bond_dim=48)),
    ],
)
def test_whitening_lowers_the_calibration_error_at_equal_cost_on_demo(
    demo_block, method, members, knobs
):
    ws = [demo_block[m][0] for m in members]
    calib = demo_block[members[0]][1]
    m, n = sum(w.shape[0] for w in ws), ws[0].shape[1]
    white_cfg = make_config(method, whiten=True, **knobs)
    plain_cfg = make_config(method, **knobs)
    weight = ws if method == "joint" else ws[0]
    white, plain = compress(weight, white_cfg, calib), compress(weight, plain_cfg)
    err = lambda f: sum(  # noqa: E731
        h_norm(
            w - (f.member_dense(i) if method == "joint" else f.to_dense()).double(), calib.hessian
        )
        ** 2
        for i, w in enumerate(ws)
    )
    assert err(white) < 0.9 * err(plain)
    extra = white_cfg.cost(m, n)[0] - plain_cfg.cost(m, n)[0]
    if method == "mpo":  # n scales; one more bond would cost the plain form far more
        bigger = make_config(method, **{**knobs, "bond_dim": knobs["bond_dim"] + 1})
        assert extra == n < bigger.cost(m, n)[0] - plain_cfg.cost(m, n)[0]
    else:
        assert extra == 0


def test_mpo_sweeps_never_raise_the_calibration_error_and_keep_a_planted_mpo(planted):
    import numpy as np

    n = 48
    x = anisotropic(800, n, 7, low=-3, high=1)
    calib = Calibration.from_activations(x)
    w = torch.randn(36, n, generator=gen(8), dtype=torch.float64)
    errs = [
        rel_h(
            w,
            compress(w, make_config("mpo", cores=3, bond_dim=5, whiten=True, sweeps=s), calib),
            calib,
        )
        for s in range(4)
    ]
    assert all(b <= a + 1e-12 for a, b in zip(errs, errs[1:], strict=False))
    assert errs[-1] < 0.95 * errs[0]
    exact, mf, nf, ranks = planted(3, mf=(3, 3, 4), nf=(3, 4, 4), ranks=(2, 3))
    w = torch.from_numpy(np.ascontiguousarray(exact))
    calib = Calibration.from_activations(anisotropic(800, 48, 9, low=-3, high=1))
    f = compress(w, make_config("mpo", cores=3, bond_dim=3, whiten=True, sweeps=2), calib)
    assert rel_h(w, f, calib) < 1e-9


@pytest.mark.parametrize("whiten", [True, False])
@pytest.mark.parametrize("knob", [{"rank": 20}, {"energy": 0.9}])
def test_a_tall_weight_compresses_as_its_svd_does(whiten, knob, monkeypatch):
    """A head-shaped weight (rows >> columns) is factored through n x n Grams, never an
    m x n float64; its factors reconstruct what the SVD of W L gives (the SVD route,
    taken here by raising the threshold), energy ranks from the weight's own spectrum."""
    from compressors import lowrank

    g = torch.Generator().manual_seed(3)
    w = torch.randn(3000, 64, generator=g, dtype=torch.float64) * torch.linspace(0.1, 3, 64)
    x = torch.randn(500, 64, generator=g, dtype=torch.float64)
    calib = Calibration(x.T @ x, 500) if whiten else None
    config = make_config("lowrank", whiten=whiten, **knob)
    tall = lowrank.compress(w, config, calib)
    monkeypatch.setattr(lowrank, "TALL", 10**9)
    svd = lowrank.compress(w, config, calib)
    assert tall.a.shape == svd.a.shape
    torch.testing.assert_close(tall.to_dense(), svd.to_dense(), rtol=0, atol=1e-12 * w.abs().max())


def test_a_tall_weights_error_curves_are_its_svds(monkeypatch):
    """The app's per-rank errors of whitened low rank (`curves`) for a head-shaped
    weight, from the n x n Gram, equal those of the SVD of W L."""
    from compressors import lowrank

    g = torch.Generator().manual_seed(4)
    w = torch.randn(2000, 48, generator=g, dtype=torch.float64) * torch.linspace(0.1, 3, 48)
    x = torch.randn(400, 48, generator=g, dtype=torch.float64)
    tall = lowrank.curves(w.numpy(), (x.T @ x).numpy())
    monkeypatch.setattr(lowrank, "TALL", 10**9)
    svd = lowrank.curves(w.numpy(), (x.T @ x).numpy())
    for a, b in zip(tall, svd, strict=True):
        assert a.shape == b.shape == (49,)
        assert abs(a - b).max() < 1e-6 and abs(a[:-1] - b[:-1]).max() / b[0] < 1e-6


def test_a_wide_weight_whitens_without_factoring_h(monkeypatch):
    """A weight with m <= n (down_proj) takes U and S^2 of W L from the m x m W H W^T:
    its compression and its error curves equal numpy's SVD of W L with L = cholesky(H)
    (the reference, in float64), without an n x n factor in the compressor."""
    from compressors import lowrank

    g = torch.Generator().manual_seed(5)
    w = torch.randn(40, 300, generator=g, dtype=torch.float64) * torch.linspace(0.1, 3, 300)
    x = torch.randn(900, 300, generator=g, dtype=torch.float64) * torch.linspace(2, 0.2, 300)
    h = (x.T @ x).numpy()
    ell = np.linalg.cholesky(h)
    u, s, _ = np.linalg.svd(w.numpy() @ ell, full_matrices=False)
    r = 11

    def no_factor(*args):
        raise AssertionError("H was factored")

    monkeypatch.setattr(lowrank, "whitening_factor", no_factor)
    want = u[:, :r] @ u[:, :r].T @ w.numpy()  # the activation-optimal rank-r weight
    config = make_config("lowrank", whiten=True, rank=r)
    got = lowrank.compress(w, config, Calibration(x.T @ x, 900))
    np.testing.assert_allclose(got.to_dense().numpy(), want, atol=1e-9 * np.abs(want).max())
    weight_err, calib_err = lowrank.curves(w.numpy(), h)
    tail = np.cumsum((s**2)[::-1])[::-1]
    np.testing.assert_allclose(calib_err[:-1] ** 2, tail / tail[0], rtol=1e-8, atol=1e-12)
    err = np.linalg.norm(w.numpy() - want) / np.linalg.norm(w.numpy())
    assert abs(weight_err[r] - err) < 1e-9
