"""One contract, every registered method: shapes, accounting, monotone error, compact
forward == dense forward, input untouched, config round trip."""

import json
import math

import pytest
import torch
import yaml

from compressors.base import DENSE_BITS, Calibration, ConfigError, config_to_dict
from compressors.registry import compress, make_config, module_methods
from spectra.linalg import mpo

M, N = 48, 40
# per method: settings of rising capacity (error must fall along them)
LADDERS = {
    "lowrank": [dict(rank=2), dict(rank=8), dict(rank=24)],
    "joint": [dict(rank=2), dict(rank=8), dict(rank=24)],
    "losparse": [
        dict(rank=2, sparsity=0.95),
        dict(rank=2, sparsity=0.7),
        dict(rank=12, sparsity=0.7),
    ],
    "mpo": [dict(cores=3, bond_dim=2), dict(cores=3, bond_dim=6), dict(cores=3, bond_dim=30)],
    "quant": [
        dict(bits=2, group_size=16),
        dict(bits=4, group_size=16),
        dict(bits=8, group_size=16),
    ],
    "prune": [dict(sparsity=0.9), dict(sparsity=0.5), dict(sparsity=0.1)],
    "caldera": [
        dict(rank=2, bits=2, factor_bits=4, group_size=16, iters=3),
        dict(rank=8, bits=3, factor_bits=4, group_size=16, iters=3),
        dict(rank=16, bits=4, factor_bits=8, group_size=16, iters=3),
    ],
}


def csr_bits(nnz):
    return DENSE_BITS * nnz + nnz * math.ceil(math.log2(N)) + 32 * (M + 1)


def expected_accounting(method, knobs, f):
    """(n_params, bits) by hand from the settings (and nnz where it is data-dependent)."""
    if method in ("lowrank", "joint"):
        p = knobs["rank"] * (M + N)
        return p, DENSE_BITS * p
    if method == "losparse":
        lr, nnz = knobs["rank"] * (M + N), round((1 - knobs["sparsity"]) * M * N)
        return lr + nnz, DENSE_BITS * lr + csr_bits(nnz)
    if method == "mpo":
        p = mpo.params_at_chi(mpo.factorize(M, 3), mpo.factorize(N, 3), knobs["bond_dim"])
        return p, DENSE_BITS * p
    if method == "quant":
        groups = M * math.ceil(N / knobs["group_size"])
        return M * N, knobs["bits"] * M * N + 2 * DENSE_BITS * groups
    if method == "prune":
        nnz = round((1 - knobs["sparsity"]) * M * N)
        return nnz, csr_bits(nnz)
    if method == "caldera":
        r, gs, fb = knobs["rank"], knobs["group_size"], knobs["factor_bits"]
        q = knobs["bits"] * M * N + 2 * DENSE_BITS * M * math.ceil(N / gs)
        lf = fb * M * r + 2 * DENSE_BITS * M * math.ceil(r / min(gs, r))
        rf = fb * r * N + 2 * DENSE_BITS * r * math.ceil(N / gs)
        return M * N + r * (M + N), q + lf + rf + DENSE_BITS + 64
    raise AssertionError(f"add {method} to expected_accounting")


def weight(seed=0):
    g = torch.Generator().manual_seed(seed)
    # a decaying spectrum, like trained weights, so capacity visibly matters
    u, _ = torch.linalg.qr(torch.randn(M, N, generator=g))
    v, _ = torch.linalg.qr(torch.randn(N, N, generator=g))
    return ((u * torch.logspace(0, -1.5, N)) @ v.T).float()


def test_every_method_has_a_ladder():
    assert set(LADDERS) == set(module_methods())  # width: tests/compressors/test_width.py


@pytest.mark.parametrize("method", sorted(module_methods()))
def test_contract(method):
    w = weight()
    before = w.clone()
    bias = torch.randn(M)
    x = torch.randn(5, 3, N)
    calib = Calibration.from_activations(
        torch.randn(500, N, generator=torch.Generator().manual_seed(9))
    )
    errors = []
    for knobs in LADDERS[method]:
        config = make_config(method, **knobs)
        f = compress(w, config, calib)
        assert torch.equal(w, before), "compress modified its input"
        dense = f.to_dense()
        assert tuple(dense.shape) == (M, N) and tuple(f.shape) == (M, N)
        assert (f.n_params, f.bits) == expected_accounting(method, knobs, f)
        assert config.cost(M, N) == (f.n_params, f.bits), "cost() disagrees with compress()"
        errors.append(f.relative_error(w))
        module = f.as_module(bias)
        torch.testing.assert_close(
            module(x), torch.nn.functional.linear(x, dense, bias), atol=2e-5, rtol=1e-4
        )
        assert (
            not any(
                isinstance(b, torch.Tensor) and b.shape == (M, N) and b.layout == torch.strided
                for b in list(module.parameters()) + list(module.buffers())
            )
            or method == "quant"
        )
    assert errors[0] > errors[1] > errors[2], errors


@pytest.mark.parametrize("method", sorted(module_methods()))
def test_config_round_trips_through_json_and_yaml(method):
    config = make_config(method, **LADDERS[method][1])
    d = config_to_dict(config)
    assert d["method"] == method
    for text in (json.dumps(d), yaml.safe_dump(d)):
        loaded = yaml.safe_load(text)
        assert make_config(loaded.pop("method"), **loaded) == config


@pytest.mark.parametrize(
    "method,knobs,field",
    [
        ("lowrank", dict(rank=0), "rank"),
        ("lowrank", dict(rank=2, energy=0.9), "rank"),
        ("lowrank", dict(energy=1.5), "energy"),
        ("losparse", dict(rank=4, sparsity=1.0), "sparsity"),
        ("losparse", dict(rank=4, sparsity=-0.1), "sparsity"),
        ("losparse", dict(rank=4, structured="cols"), "structured"),
        ("mpo", dict(cores=1), "cores"),
        ("mpo", dict(cores=7), "cores"),
        ("mpo", dict(bond_dim=0), "bond_dim"),
        ("quant", dict(bits=1), "bits"),
        ("quant", dict(bits=9), "bits"),
        ("quant", dict(bits=16), "bits"),
        ("prune", dict(sparsity=1.0), "sparsity"),
        ("prune", dict(density=0.5), "density"),
        ("lowrank", dict(rank=4, bits=4), "bits"),
        ("joint", dict(rank=0), "rank"),
        ("nosuch", dict(), "method"),
        ("caldera", dict(bits=1), "bits"),
        ("caldera", dict(factor_bits=12), "factor_bits"),
        ("caldera", dict(rank=0), "rank"),
    ],
)
def test_bad_settings_name_field_and_value(method, knobs, field):
    with pytest.raises(ConfigError, match=field) as e:
        make_config(method, **knobs)
    assert "=" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize(
    "method,knobs",
    [
        ("lowrank", dict(rank=41)),
        ("losparse", dict(rank=41)),
        ("joint", dict(rank=41)),
        ("caldera", dict(rank=41)),
    ],
)
def test_rank_above_min_dim_is_refused(method, knobs):
    calib = Calibration.from_activations(torch.randn(100, N))
    with pytest.raises(ConfigError, match="min\\(m, n\\) = 40"):
        compress(weight(), make_config(method, **knobs), calib)


@pytest.mark.parametrize(
    "method,knobs",
    [
        ("losparse", dict(rank=3, sparsity=0.8, structured="rows")),
        ("prune", dict(sparsity=0.625, wanda=True)),
        ("quant", dict(bits=3, group_size=7, gptq=True)),
        ("caldera", dict(rank=4, bits=2, factor_bits=16, group_size=16, iters=2)),
        ("caldera", dict(rank=4, bits=3, factor_bits=4, group_size=16, iters=2, incoherence=False)),
    ],
)
def test_cost_matches_compress_for_every_variant(method, knobs):
    calib = Calibration.from_activations(
        torch.randn(300, N, generator=torch.Generator().manual_seed(3))
    )
    config = make_config(method, **knobs)
    f = compress(weight(1), config, calib)
    assert config.cost(M, N) == (f.n_params, f.bits)
