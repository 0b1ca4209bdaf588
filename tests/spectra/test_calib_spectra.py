"""Activation-aware spectra: their tails are the calibration-weighted errors of the
whitened truncation, and `spectra analyze --calib` adds them per module."""

import json

import numpy as np
import pytest
import torch

from compressors.base import Calibration
from compressors.registry import compress, make_config
from spectra.cli import main
from spectra.data.calib_spectra import activation_spectrum
from spectra.io.model import open_model


@pytest.mark.parametrize("seed", [0, 7])
def test_tail_sums_are_the_whitened_truncation_errors_on_explicit_activations(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(300, 24, generator=g, dtype=torch.float64) * torch.logspace(-2, 1, 24)
    w = torch.randn(18, 24, generator=g, dtype=torch.float64)
    s = activation_spectrum(w, x.T @ x)
    calib = Calibration.from_activations(x)
    for k in range(1, 18):
        w_k = compress(w, make_config("lowrank", rank=k, whiten=True), calib).to_dense()
        explicit = float(torch.linalg.norm((w - w_k) @ x.T) ** 2)
        assert float((s[k:] ** 2).sum()) == pytest.approx(explicit, rel=1e-6)
    total = float(torch.linalg.norm(w @ x.T) ** 2)
    assert float((s**2).sum()) == pytest.approx(total, rel=1e-9)


def test_with_identity_activations_it_is_the_weight_spectrum():
    w = torch.randn(10, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    s = activation_spectrum(w, torch.eye(16, dtype=torch.float64))
    np.testing.assert_allclose(s, torch.linalg.svdvals(w).numpy(), rtol=1e-12)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_analyze_calib_adds_the_columns_per_module(family, family_dir, capsys):
    from compressors.apply import linear_targets
    from spectra.data import calibration

    path = str(family_dir(family))
    assert main(["analyze", path, "--calib", "--no-mpo", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)["rows"]}
    model = open_model(path, "cpu", "float32", "none").load()
    grams = calibration.calibrate(open_model(path))
    targets = linear_targets(model)
    in_blocks = [n for n, (t, _) in targets.items() if t.block is not None]
    assert in_blocks and all(rows[n]["calib_erank"] > 1 for n in in_blocks)
    assert all(
        rows[n]["calib_energy_rank_90"] <= rows[n]["calib_energy_rank_99"] for n in in_blocks
    )
    outside = [n for n in rows if rows[n]["block"] is None]
    assert outside and all(rows[n]["calib_erank"] is None for n in outside)
    # the spectrum is that of the (out, in) weight times the cached H's factor
    name = in_blocks[-1]
    t, mod = targets[name]
    block = grams[t.block]
    want = activation_spectrum(t.weight(mod).double(), block[name][0])
    from spectra.data.calib_spectra import calib_table

    info = {}
    table = calib_table(open_model(path), info=info)
    assert info["cached"] and info["spectra_cached"]
    got = table.filter(table["name"] == name)["calib_sigma"].to_list()[0]
    np.testing.assert_allclose(got, want, rtol=1e-9)
