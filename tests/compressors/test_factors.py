"""Quantized factors (`factor_bits`, `factor_group_size`) of lowrank, joint, losparse and
mpo: exact cost, compact forward equal to the reconstruction, error falling with the
bits, and a save/load round trip."""

import pytest
import torch

from compressors import factors
from compressors.registry import compress, make_config
from spectra.errors import SpectraInputError

M, N = 48, 60
KNOBS = {
    "lowrank": dict(rank=12),
    "joint": dict(rank=12),
    "losparse": dict(rank=8, sparsity=0.9),
    "mpo": dict(cores=2, bond_dim=8),
}


def weight(seed=0, m=M, n=N):
    g = torch.Generator().manual_seed(seed)
    # a decaying spectrum, as trained weights have
    u = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64)).Q
    s = torch.logspace(0, -2, min(m, n), dtype=torch.float64)
    return (u[:, : len(s)] * s) @ v[:, : len(s)].T


def factorize(method, w, bits, group_size=16):
    config = make_config(method, factor_bits=bits, factor_group_size=group_size, **KNOBS[method])
    arg = [w[: M // 2], w[M // 2 :]] if method == "joint" else w
    return config, compress(arg, config)


@pytest.mark.parametrize("method", list(KNOBS))
@pytest.mark.parametrize("bits", [2, 3, 4, 8, 16])
def test_cost_is_what_is_stored_and_the_forward_is_the_reconstruction(method, bits):
    w = weight()
    config, f = factorize(method, w, bits)
    assert config.cost(M, N) == (f.n_params, f.bits)
    if bits < 16:
        stored = [f.a, f.b] if hasattr(f, "b") else [f.v, *f.a] if method == "joint" else f.cores
        assert all(isinstance(x, factors.QuantizedFactor) for x in stored)
        assert all(int(x.q.codes.max()) < 2**bits for x in stored)
    x = torch.randn(5, N, dtype=torch.float64)
    if method == "joint":
        members = f.member_modules()
        got = torch.cat([mod(x) for mod in members], dim=1)
    else:
        got = f.as_module()(x)
    torch.testing.assert_close(got, x @ f.to_dense().T, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("method", list(KNOBS))
def test_the_error_falls_as_factor_bits_rise(method):
    w = weight(1)
    errs = [factorize(method, w, b)[1].relative_error(w) for b in (2, 3, 4, 6, 8)]
    plain = factorize(method, w, 16)[1].relative_error(w)
    assert all(a > b for a, b in zip(errs, errs[1:], strict=False)), errs
    assert errs[-1] < 1.05 * plain and errs[0] > 1.05 * plain, (errs, plain)


def test_cost_counts_codes_scales_and_zero_points_exactly():
    config = make_config("lowrank", rank=10, factor_bits=4, factor_group_size=16)
    # A (48, 10): one group of 10 per row; B (10, 60): four groups of 16 per row
    want = 4 * 10 * (48 + 60) + 32 * 48 * 1 + 32 * 10 * 4
    assert config.cost(48, 60) == (10 * 108, want)
    mpo = make_config("mpo", cores=2, bond_dim=8, factor_bits=4, factor_group_size=64)
    # 48 = 6 x 8 and 60 = 6 x 10: cores (1, 6, 6, 8) and (8, 8, 10, 1)
    shapes = [(1, 6, 6, 8), (8, 8, 10, 1)]
    assert [f for f in (48, 60)] and mpo.cost(48, 60)[1] == sum(
        factors.factor_cost(s, 4, 64) for s in shapes
    )
    assert factors.factor_cost((1, 6, 6, 8), 4, 64) == 4 * 288 + 32 * 6


def test_quantized_factors_survive_a_save_and_load(tmp_path):
    from compressors import io

    tensors = {}
    for method in KNOBS:
        _, f = factorize(method, weight(2), 4)
        desc = io.flatten(f, method, tensors)
        back = io.unflatten(desc, tensors)
        torch.testing.assert_close(back.to_dense(), f.to_dense(), rtol=0, atol=0)
        assert back.bits == f.bits


@pytest.mark.parametrize(
    ("knobs", "match"),
    [
        (dict(factor_bits=1), "factor_bits=1"),
        (dict(factor_bits=12), "factor_bits=12"),
        (dict(factor_bits=True), "factor_bits=True"),
        (dict(factor_group_size=0), "factor_group_size=0"),
    ],
)
@pytest.mark.parametrize("method", list(KNOBS))
def test_bad_factor_settings_name_the_knob(method, knobs, match):
    with pytest.raises(SpectraInputError, match=match):
        make_config(method, **KNOBS[method], **knobs)
