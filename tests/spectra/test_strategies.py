"""Allocation strategies (spectra.plan.strategies) and FARMS alpha (spectra.linalg.farms):
the mapping meets the budget, alpha and farms prune random blocks more than trained-like
ones, FARMS recovers a planted exponent where plain alpha drifts, OWL's outlier ratio is
the one computed from the activations themselves."""

import numpy as np
import pytest
import torch

from spectra.io.model import open_model
from spectra.linalg.farms import FarmsSettings, farms_alpha
from spectra.linalg.metrics import spectrum_metrics
from spectra.linalg.svd import singular_values
from spectra.plan.allocate import Candidate, Unit
from spectra.plan.rule_scores import outlier_ratio, owl_values
from spectra.plan.strategies import (
    Strategy,
    allocate_strategy,
    block_scores,
)


def fine_units(blocks=4, per_block=3, dense=200, key="params"):
    """Units whose every cost 0..dense is a candidate (damage falling with cost)."""
    units = []
    for b in range(blocks):
        for j in range(per_block):
            size = dense * (1 + j)  # unequal sizes: the mean is parameter-weighted
            scale = 16 if key == "bits" else 1
            cands = [
                Candidate(None if k == size else k, k, k * scale, (size - k) / size)
                for k in range(size + 1)
            ]
            units.append(Unit((f"layers.{b}.m{j}",), cands, size, f"r{j}", b))
    return units


@pytest.mark.parametrize("strategy", ["uniform", "alpha", "farms", "owl"])
@pytest.mark.parametrize("key", ["params", "bits"])
def test_the_mapping_meets_the_budget_exactly(strategy, key):
    units = fine_units(key=key)
    values = {n: 2.0 + u.block for u in units for n in u.names}  # block scores 2, 3, 4, 5
    dense = sum(u.params_before for u in units) * (16 if key == "bits" else 1)
    for target in (0.3, 0.55, 0.8):
        budget = int(target * dense)
        chosen, record = allocate_strategy(Strategy(strategy), units, budget, key, values)
        assert sum(c.cost(key) for c in chosen) == budget
        assert record["strategy"] == strategy


def test_alpha_maps_onto_one_plus_minus_e_times_the_target_parameter_weighted():
    """Removed shares (1 + e z) x r: z from -1 (lowest alpha) to +1 (highest), the
    parameter-weighted mean of the removed shares equal to the target's."""
    units = fine_units(blocks=3, per_block=2, dense=1000)
    values = {n: [2.0, 3.0, 4.0][u.block] for u in units for n in u.names}
    dense = sum(u.params_before for u in units)
    chosen, record = allocate_strategy(
        Strategy("alpha", e=0.2), units, int(0.5 * dense), "params", values
    )
    removed = {}
    for u, c in zip(units, chosen, strict=True):
        removed.setdefault(u.block, []).append(1 - c.params / u.params_before)
    r = {b: float(np.mean(v)) for b, v in removed.items()}
    mean = (
        sum(
            (1 - c.params / u.params_before) * u.params_before
            for u, c in zip(units, chosen, strict=True)
        )
        / dense
    )
    assert mean == pytest.approx(0.5, abs=1e-3)
    assert r[0] == pytest.approx(mean * 0.8, abs=2e-3)  # lowest alpha: (1 - e)
    assert r[1] == pytest.approx(mean * 1.0, abs=2e-3)
    assert r[2] == pytest.approx(mean * 1.2, abs=2e-3)  # highest alpha: (1 + e)
    assert record["e"] == 0.2 and record["blocks"] == {0: 2.0, 1: 3.0, 2: 4.0}


def test_owl_is_an_additive_band_and_more_outliers_keep_more():
    units = fine_units(blocks=3, per_block=2, dense=1000)
    values = {n: [0.01, 0.02, 0.03][u.block] for u in units for n in u.names}
    dense = sum(u.params_before for u in units)
    chosen, _ = allocate_strategy(
        Strategy("owl", band=0.08), units, int(0.4 * dense), "params", values
    )
    kept = {}
    for u, c in zip(units, chosen, strict=True):
        kept.setdefault(u.block, []).append(c.params / u.params_before)
    k = {b: float(np.mean(v)) for b, v in kept.items()}
    assert k[2] - k[0] == pytest.approx(0.16, abs=3e-3)
    assert k[1] == pytest.approx(0.4, abs=3e-3)


def test_undefined_scores_fall_back_to_the_block_then_the_global_mean():
    units = fine_units(blocks=3, per_block=2)
    values = {
        "layers.0.m0": 2.0,
        "layers.0.m1": float("nan"),  # block mean: 2.0
        "layers.1.m0": 4.0,
        "layers.1.m1": 6.0,
        # block 2: nothing defined -> the mean of the other blocks (2 + 5) / 2
    }
    scores, fallback = block_scores(units, values)
    assert [scores[i] for i in range(6)] == [2.0, 2.0, 5.0, 5.0, 3.5, 3.5]
    assert fallback == {
        "layers.0.m1": "block mean",
        "layers.2.m0": "global mean",
        "layers.2.m1": "global mean",
    }


@pytest.mark.parametrize(
    "args",
    [
        dict(name="bogus"),
        dict(name="alpha", e=0.0),
        dict(name="alpha", e=1.0),
        dict(name="owl", band=1.5),
    ],
)
def test_bad_knobs_are_input_errors(args):
    from spectra.errors import SpectraInputError

    with pytest.raises(SpectraInputError):
        Strategy(**args)


# FARMS


def planted_tiles(m, n, alpha, seed, b=128):
    """A matrix of independent b x b tiles, each with eigenvalues (sigma^2) drawn from
    the power law p(x) ~ x^-alpha, x >= 1: FARMS's submatrices carry the planted law."""
    rng = np.random.default_rng(seed)
    w = np.zeros((m, n))
    for i in range(m // b):
        for j in range(n // b):
            lam = rng.pareto(alpha - 1, size=b) + 1
            u, _ = np.linalg.qr(rng.standard_normal((b, b)))
            v, _ = np.linalg.qr(rng.standard_normal((b, b)))
            w[i * b : (i + 1) * b, j * b : (j + 1) * b] = (u * np.sqrt(lam)) @ v.T
    return w


@pytest.mark.parametrize("random_state", [1, 1234])
@pytest.mark.parametrize("shape", [(256, 1024), (1024, 256), (256, 2048)])
def test_farms_recovers_a_planted_exponent_where_plain_alpha_drifts(shape, random_state):
    w = planted_tiles(*shape, 2.5, random_state)
    plain = spectrum_metrics(singular_values(w))["alpha"]
    farms = farms_alpha(w, FarmsSettings(tile=128, max_tiles=16))
    assert abs(plain - 2.5) > 0.3, plain  # the aspect ratio biases plain alpha
    assert abs(farms["farms_alpha"] - 2.5) < 0.1, farms
    assert farms["farms_n"] > 128  # the fit pools several tiles' eigenvalues


def test_farms_of_a_square_tile_is_plain_alpha():
    w = planted_tiles(128, 128, 2.5, 0)
    assert farms_alpha(w)["farms_alpha"] == pytest.approx(
        spectrum_metrics(singular_values(w))["alpha"]
    )


# OWL


def test_outlier_ratio_is_the_share_of_wanda_scores_above_five_means():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((500, 32))
    x[:, 3] *= 40  # an outlier channel
    ws = [rng.standard_normal((16, 32)), rng.standard_normal((24, 32))]
    h = x.T @ x
    direct = np.concatenate([(np.abs(w) * np.linalg.norm(x, axis=0)).ravel() for w in ws])
    expect = float((direct > 5 * direct.mean()).mean())
    assert expect > 0.01  # the planted channel makes outliers
    assert outlier_ratio(ws, [np.diag(h)] * 2) == pytest.approx(expect, abs=1e-12)


def test_owl_ratios_of_a_calibrated_model_equal_those_of_its_captured_inputs(family_dir):
    """The block's outlier ratio from the calibration cache's Grams equals the one from
    the inputs each linear module receives on the same windows, captured by hooks."""
    from compressors.apply import linear_targets
    from spectra.data.calibration import CalibrationSpec, calibrate, calibration_windows
    from spectra.plan.auto import load_modules
    from spectra.plan.candidates import Damage, units_for
    from spectra.plan.grid import Floors

    spec = str(family_dir("llama"))
    settings = CalibrationSpec(samples=4, seqlen=64)
    grams = calibrate(open_model(spec, "cpu"), settings)
    modules = load_modules(open_model(spec).matrices)
    units = units_for(modules, "prune", Damage(), Floors())
    got = owl_values(units, {m.name: m.weight for m in modules}, grams.hessians())

    model = open_model(spec, "cpu", "float32", "none").load()
    inputs: dict[str, list] = {}
    hooks = [
        mod.register_forward_hook(
            lambda _m, args, _o, name=name: inputs.setdefault(name, []).append(args[0].detach())
        )
        for name, (_, mod) in linear_targets(model).items()
    ]
    with torch.no_grad():
        model(calibration_windows(open_model(spec).tokenizer(), settings))
    for h in hooks:
        h.remove()
    weights = {m.name: m.weight.double() for m in modules}
    for block in (0, 1):
        names = [m.name for m in modules if m.block == block]
        scores = []
        for n in names:
            x = torch.cat(inputs[n]).reshape(-1, weights[n].shape[1]).double()  # (tokens, in)
            scores.append((weights[n].abs() * x.norm(dim=0)).reshape(-1))
        pooled = torch.cat(scores)
        direct = float((pooled > 5 * pooled.mean()).double().mean())
        assert all(got[n] == pytest.approx(direct, rel=1e-6) for n in names), (got, direct)
    assert "lm_head" not in got  # outside the blocks: no Gram, the documented fallback


# alpha and farms on a planted model


@pytest.fixture(scope="module")
def planted_llama(tmp_path_factory):
    """A 4-block Llama whose blocks 0 and 2 have heavy-tailed spectra (eigenvalues from a
    power law with exponent 2, like trained layers) and blocks 1 and 3 i.i.d. Gaussian
    ones (Marchenko-Pastur: random, untrained); block 0's o_proj is all zeros (no alpha)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=128,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg)
    rng = np.random.default_rng(0)
    with torch.no_grad():
        for b, layer in enumerate(model.model.layers):
            for name, mod in layer.named_modules():
                if not isinstance(mod, torch.nn.Linear):
                    continue
                m, n = mod.weight.shape
                if b % 2 == 0:
                    k = min(m, n)
                    u, _ = np.linalg.qr(rng.standard_normal((m, k)))
                    v, _ = np.linalg.qr(rng.standard_normal((n, k)))
                    lam = (rng.pareto(1.0, size=k) + 1) * 1e-3
                    w = (u * np.sqrt(lam)) @ v.T
                else:
                    w = rng.standard_normal((m, n)) * 0.02
                if b == 0 and name == "self_attn.o_proj":
                    w = np.zeros((m, n))
                mod.weight.copy_(torch.from_numpy(w))
    path = tmp_path_factory.mktemp("planted-llama")
    model.save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("strategy", ["alpha", "farms"])
def test_alpha_allocation_prunes_the_random_blocks_more(planted_llama, strategy):
    from spectra.plan.auto import auto_plan

    result = auto_plan(
        open_model(planted_llama), "prune", target_params=0.5, strategy=Strategy(strategy)
    )
    assert result.spent <= result.budget
    layers = result.plan.layers
    sparsity = {}
    for name, config in layers.items():
        block = int(name.split(".")[2]) if name.startswith("model.layers.") else None
        sparsity.setdefault(block, []).append(config.sparsity)
    heavy = np.mean(sparsity[0] + sparsity[2])
    random = np.mean(sparsity[1] + sparsity[3])
    assert random > heavy + 0.1, sparsity
    record = result.plan.allocation
    assert record["strategy"] == strategy and record["e"] == 0.3  # magnitude pruning's e
    assert min(record["blocks"][1], record["blocks"][3]) > max(
        record["blocks"][0], record["blocks"][2]
    )
    assert record["fallback"] == {"model.layers.0.self_attn.o_proj": "block mean"}
