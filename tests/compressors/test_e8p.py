"""E8P (QuIP#'s 2-bit E8 lattice codebook): the codebook, the nearest-codeword search
against brute force, block LDLQ, and the error against the scalar 2-bit grid on
Gaussian data and on the demo's own matrices."""

import pytest
import torch

from compressors import e8p
from compressors.base import Calibration
from compressors.registry import compress, make_config
from spectra.errors import SpectraInputError


def gen(seed):
    return torch.Generator().manual_seed(seed)


def h_error(w, w_hat, h):
    e = (w - w_hat).double()
    return float(torch.einsum("ij,jk,ik->", e, h.double(), e))


def test_the_codebook_is_2_16_distinct_points_of_e8_plus_a_quarter():
    pats = e8p.patterns()
    assert pats.shape == (256, 8) and len({tuple(p.tolist()) for p in pats}) == 256
    norms = (pats * pats).sum(1)
    assert int((norms <= 10).sum()) == 227 and int((norms == 12).sum()) == 29
    book = e8p.decode(torch.arange(2**16))
    assert torch.unique(book, dim=0).shape[0] == 2**16
    y = book - 0.25  # in E8: all integers or all half-integers, coordinate sum even
    integer = (y == y.round()).all(1)
    half = (y - 0.5 == (y - 0.5).round()).all(1)
    assert bool((integer | half).all()) and bool((torch.remainder(y.sum(1), 2) == 0).all())


@pytest.mark.parametrize("scale", [0.3, 1.0, 2.5])
def test_nearest_equals_a_brute_force_search_over_every_codeword(scale):
    x = torch.randn(1500, 8, generator=gen(1), dtype=torch.float64) * scale
    codes = e8p.nearest(x)
    assert codes.dtype == torch.int32 and int(codes.min()) >= 0 and int(codes.max()) < 2**16
    book = e8p.decode(torch.arange(2**16))
    want = torch.cdist(x, book).min(1).values
    got = (e8p.decode(codes) - x).norm(dim=1)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_e8p_beats_the_scalar_2_bit_grid_on_gaussian_data():
    from compressors.grids import dequantize, grid, quantize

    w = torch.randn(128, 256, generator=gen(2), dtype=torch.float64)
    _, rec = e8p.round_rows(w, e8p.row_scales(w))
    e8p_mse = float((w - rec).pow(2).mean())
    scale, zero = grid(w, 2, 64, observer="mse")  # 2.5 bits per weight with its grid
    scalar = dequantize(quantize(w, scale, zero, 2, 64), scale, zero, 64)
    scalar_mse = float((w - scalar).pow(2).mean())
    assert e8p_mse < 0.8 * scalar_mse, (e8p_mse, scalar_mse)
    assert 0.085 < e8p_mse < 0.095  # QuIP# reports ~0.089 for E8P on N(0, 1)


def correlated(n, seed, rows=800):
    g = gen(seed)
    mix = torch.eye(n, dtype=torch.float64) + 0.4 * torch.randn(n, n, generator=g).double()
    scales = torch.logspace(-1, 1, n, dtype=torch.float64)
    return Calibration.from_activations(torch.randn(rows, n, generator=g).double() * scales @ mix)


def test_block_ldlq_lowers_the_calibration_error_below_rounding():
    calib = correlated(64, 3)
    w = torch.randn(24, 64, generator=gen(4), dtype=torch.float64)
    codes, scale = e8p.ldlq(w, calib.hessian)
    fed = e8p.E8PQuantized(codes, scale).to_dense()
    _, rounded = e8p.round_rows(w, scale)  # same grid, no feedback
    assert h_error(w, fed, calib.hessian) < 0.8 * h_error(w, rounded, calib.hessian)


def test_quip_sharp_costs_what_it_stores_and_its_forward_is_the_reconstruction():
    calib = correlated(64, 5)
    w = torch.randn(32, 64, generator=gen(6), dtype=torch.float64)
    config = make_config("quant", bits=2, gptq=True, quantizer="e8p")
    f = compress(w, config, calib)
    assert config.cost(32, 64) == (f.n_params, f.bits) == (32 * 64, 2 * 32 * 64 + 16 * 32 + 64)
    x = torch.randn(5, 64, generator=gen(7), dtype=torch.float64)
    torch.testing.assert_close(f.as_module()(x), x @ f.to_dense().T, rtol=1e-9, atol=1e-9)


@pytest.mark.demo
@pytest.mark.slow
def test_on_demo_matrices_e8p_beats_the_scalar_2_bit_grid(demo_block):
    """GPTQ at 2 bits (g64, 2.5 bits per weight) against QuIP#-style E8P (2 bits plus a
    row scale), both under the demo's own H, on two of block 5's matrices."""
    for name in ("q_proj", "o_proj"):
        w, calib = demo_block[name]
        scalar = compress(w, make_config("quant", bits=2, group_size=64, gptq=True), calib)
        lattice = compress(w, make_config("quant", bits=2, gptq=True, quantizer="e8p"), calib)
        assert lattice.bits < scalar.bits
        e_lat = h_error(w, lattice.to_dense(), calib.hessian)
        e_sca = h_error(w, scalar.to_dense(), calib.hessian)
        assert e_lat < e_sca, (name, e_lat, e_sca)


def test_caldera_takes_the_e8p_backbone():
    calib = correlated(64, 8)
    w = torch.randn(48, 64, generator=gen(9), dtype=torch.float64)
    knobs = dict(rank=4, bits=2, factor_bits=4, group_size=16, iters=3)
    lattice_cfg = make_config("caldera", quantizer="e8p", **knobs)
    lattice = compress(w, lattice_cfg, calib)
    scalar = compress(w, make_config("caldera", **knobs), calib)
    assert isinstance(lattice.q, e8p.E8PQuantized)
    assert lattice_cfg.cost(48, 64) == (lattice.n_params, lattice.bits)
    assert lattice.h_error < scalar.h_error
    x = torch.randn(3, 64, generator=gen(10), dtype=torch.float64)
    torch.testing.assert_close(lattice.as_module()(x), x @ lattice.to_dense().T)


@pytest.mark.parametrize(
    ("method", "knobs", "match"),
    [
        ("quant", dict(bits=3, gptq=True, quantizer="e8p"), "2 bits per weight"),
        ("quant", dict(bits=2, quantizer="e8p"), "needs gptq"),
        ("quant", dict(bits=2, gptq=True, quantizer="lattice"), "quantizer='lattice'"),
        ("caldera", dict(bits=3, quantizer="e8p"), "2 bits per weight"),
    ],
)
def test_bad_quantizer_settings_are_refused(method, knobs, match):
    with pytest.raises(SpectraInputError, match=match):
        make_config(method, **knobs)


def test_e8p_needs_whole_blocks_of_eight_inputs():
    config = make_config("quant", bits=2, gptq=True, quantizer="e8p")
    with pytest.raises(SpectraInputError, match="blocks of 8"):
        config.check_shape(16, 60)
