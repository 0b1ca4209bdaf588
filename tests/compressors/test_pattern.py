"""N:M semi-structured pruning (`prune` with `pattern`): the layout it promises, its exact
cost, SparseGPT's N:M variant against its definition, and the order of the three
scorers on the demo's own matrices and activations."""

import math

import pytest
import torch

from compressors.base import Calibration
from compressors.registry import compress, make_config
from spectra.errors import SpectraInputError


def gen(seed):
    return torch.Generator().manual_seed(seed)


def calibration(seed, n, rows=400):
    """Inputs with unequal, correlated feature scales."""
    g = gen(seed)
    scales = torch.logspace(-1.5, 1, n, dtype=torch.float64)[torch.randperm(n, generator=g)]
    mix = torch.eye(n, dtype=torch.float64) + 0.3 * torch.randn(
        n, n, generator=g, dtype=torch.float64
    )
    return Calibration.from_activations(
        torch.randn(rows, n, generator=g, dtype=torch.float64) * scales @ mix
    )


def h_error(w, w_hat, h):
    e = (w - w_hat).double()
    return float(torch.einsum("ij,jk,ik->", e, h, e))


KINDS = {"magnitude": {}, "wanda": {"wanda": True}, "sparsegpt": {"sparsegpt": True}}


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize(
    ("pattern", "keep", "group"), [("2:4", 2, 4), ("4:8", 4, 8), ("1:4", 1, 4)]
)
def test_every_group_keeps_exactly_n_and_costs_what_the_layout_holds(kind, pattern, keep, group):
    rows, cols = 12, 48
    w = torch.randn(rows, cols, generator=gen(1), dtype=torch.float64)
    config = make_config("prune", pattern=pattern, **KINDS[kind])
    assert config.sparsity == pytest.approx(1 - keep / group)
    f = compress(w, config, calibration(2, cols))
    dense = f.to_dense()
    per_group = (dense != 0).reshape(rows, cols // group, group).sum(2)
    assert torch.equal(per_group, torch.full_like(per_group, keep))
    if kind != "sparsegpt":  # kept entries are the original weights
        assert torch.equal(dense[dense != 0], w[dense != 0])
    nnz = rows * cols * keep // group
    bits = nnz * (16 + math.ceil(math.log2(group)))  # values + positions, no row pointers
    assert config.cost(rows, cols) == (f.n_params, f.bits) == (nnz, bits)
    x = torch.randn(5, cols, generator=gen(3), dtype=torch.float64)
    torch.testing.assert_close(f.as_module()(x), x @ dense.T)


def textbook_sparsegpt_nm(w, h, keep, group):
    """SparseGPT's N:M variant (Frantar & Alistarh 2023, section 3.3): every later column
    updated at once, each group's mask (the group - keep least salient w^2 / U_ii^2 of a
    row pruned) chosen when the sweep reaches its first column."""
    n = w.shape[1]
    hd = h.clone()
    dead = torch.diagonal(hd) == 0
    hd[dead, dead] = 1
    hd += 0.01 * torch.diagonal(hd).mean() * torch.eye(n, dtype=hd.dtype)
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(hd)), upper=True)
    w = w.clone()
    w[:, dead] = 0
    mask = torch.ones_like(w, dtype=torch.bool)
    for i in range(n):
        if i % group == 0:
            sal = w[:, i : i + group].pow(2) / torch.diagonal(u)[i : i + group].pow(2)
            order = torch.argsort(sal, dim=1, stable=True)
            for r in range(w.shape[0]):
                mask[r, i + order[r, : group - keep]] = False
        q = torch.where(mask[:, i], w[:, i], torch.zeros_like(w[:, i]))
        e = (w[:, i] - q) / u[i, i]
        w[:, i:] -= e[:, None] * u[i, i:][None, :]
        w[:, i] = q
    return w, mask


@pytest.mark.parametrize(("keep", "group", "block"), [(2, 4, 16), (2, 4, 128), (4, 8, 12)])
def test_sparsegpt_nm_equals_the_textbook_algorithm(keep, group, block):
    from compressors.prune import sparsegpt

    calib = calibration(5, 48)
    w = torch.randn(10, 48, generator=gen(6), dtype=torch.float64)
    got, mask = sparsegpt(w, calib.hessian, 1 - keep / group, block=block, nm=(keep, group))
    want, want_mask = textbook_sparsegpt_nm(w, calib.hessian, keep, group)
    assert torch.equal(mask, want_mask)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


@pytest.mark.demo
@pytest.mark.slow
def test_on_demo_matrices_sparsegpt_beats_wanda_beats_magnitude_at_2_4(demo_block):
    for name in ("q_proj", "up_proj", "down_proj"):
        w, calib = demo_block[name]
        err = {
            kind: h_error(
                w,
                compress(w, make_config("prune", pattern="2:4", **knobs), calib).to_dense(),
                calib.hessian,
            )
            for kind, knobs in KINDS.items()
        }
        assert err["sparsegpt"] < err["wanda"] < err["magnitude"], (name, err)


@pytest.mark.parametrize(
    ("knobs", "match"),
    [
        (dict(pattern="3:2"), "pattern='3:2'"),
        (dict(pattern="4:4"), "pattern='4:4'"),
        (dict(pattern="0:4"), "pattern='0:4'"),
        (dict(pattern="2:4:8"), "pattern='2:4:8'"),
        (dict(pattern="2/4"), "pattern='2/4'"),
        (dict(pattern=4), "pattern=4"),
        (dict(pattern="2:4", sparsity=0.3), "fixes sparsity at 0.5"),
        (dict(sparsity="half"), "must be a number"),
    ],
)
def test_bad_patterns_are_refused_with_the_knob_named(knobs, match):
    with pytest.raises(SpectraInputError, match=match):
        make_config("prune", **knobs)


def test_a_pattern_needs_whole_groups_of_input_features():
    config = make_config("prune", pattern="2:4", wanda=True)
    config.check_shape(8, 64)
    with pytest.raises(SpectraInputError, match="divisible by 4, this module has 30"):
        config.check_shape(8, 30)


def test_an_unpatterned_prune_keeps_its_old_settings():
    assert make_config("prune").sparsity == 0.5
    assert make_config("prune", sparsity=0.25).pattern is None
    assert make_config("prune", pattern="2:4", sparsity=0.5).sparsity == 0.5
