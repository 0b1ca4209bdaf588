"""Metrics against direct computations on matrices with known answers."""

import math

import numpy as np
import pytest

from spectra.linalg.metrics import energy_rank, powerlaw_fit, rank_error_curve, spectrum_metrics
from spectra.linalg.svd import singular_values


def metrics_of(w):
    return spectrum_metrics(singular_values(w))


def test_identity():
    n = 40
    m = metrics_of(np.eye(n))
    assert m["sigma_max"] == pytest.approx(1.0)
    assert m["fro_norm"] == pytest.approx(math.sqrt(n))
    assert m["nuclear_norm"] == pytest.approx(n)
    assert m["stable_rank"] == pytest.approx(n)
    assert m["erank"] == pytest.approx(n)
    assert m["participation_ratio"] == pytest.approx(n)
    assert m["energy_rank_90"] == 36 and m["energy_rank_99"] == 40


@pytest.mark.parametrize("r", [1, 3, 10])
def test_flat_rank_r(r):
    rng = np.random.default_rng(r)
    u, _ = np.linalg.qr(rng.standard_normal((50, r)))
    v, _ = np.linalg.qr(rng.standard_normal((30, r)))
    m = metrics_of(2.5 * u @ v.T)  # r equal singular values 2.5, the rest 0
    assert m["sigma_max"] == pytest.approx(2.5)
    for key in ("stable_rank", "erank", "participation_ratio"):
        assert m[key] == pytest.approx(r, rel=1e-9)
    assert m["energy_rank_99"] == r
    assert m["energy_rank_90"] == math.ceil(0.9 * r)


def test_norms_match_numpy_matrix_norms():
    w = np.random.default_rng(7).standard_normal((90, 60))
    m = metrics_of(w)
    assert m["sigma_max"] == pytest.approx(np.linalg.norm(w, 2), rel=1e-12)
    assert m["fro_norm"] == pytest.approx(np.linalg.norm(w, "fro"), rel=1e-12)
    assert m["nuclear_norm"] == pytest.approx(np.linalg.norm(w, "nuc"), rel=1e-10)
    assert m["stable_rank"] == pytest.approx(
        np.linalg.norm(w, "fro") ** 2 / np.linalg.norm(w, 2) ** 2
    )


def test_energy_rank_and_error_curve_against_truncated_svd():
    w = np.random.default_rng(2).standard_normal((40, 30)) @ np.diag(np.linspace(3, 0.1, 30))
    u, s, vt = np.linalg.svd(w, full_matrices=False)
    curve = rank_error_curve(singular_values(w))
    assert curve[0] == pytest.approx(1.0) and curve[-1] == pytest.approx(0.0, abs=1e-12)
    for k in (1, 5, 17, 29):
        wk = (u[:, :k] * s[:k]) @ vt[:k]
        assert curve[k] == pytest.approx(np.linalg.norm(w - wk) / np.linalg.norm(w), rel=1e-8)
    # energy rank: smallest k whose kept energy reaches q
    q = 0.9
    k = energy_rank(s, q)
    assert 1 - curve[k] ** 2 >= q - 1e-12 > 1 - curve[k - 1] ** 2


def _ww_style_fit(evals, thresh=1e-5):
    """The plain loop of the CSN fit as WeightWatcher writes it: a reference, not our code."""
    x = np.sort(evals[evals > thresh])
    logx, big = np.log(x), len(x)
    best = (np.inf, None, None)
    for i in range(big - 1):
        n = big - i
        alpha = 1 + n / (logx[i:].sum() - n * logx[i])
        d = 1.0
        if alpha > 1:
            d = np.max(np.abs(1 - (x[i:] / x[i]) ** (1 - alpha) - np.arange(n) / n))
        if d < best[0]:
            best = (d, alpha, x[i])
    return best[1], best[2], best[0]


@pytest.mark.parametrize("random_state", [1, 1234])
def test_alpha_equals_reference_loop(random_state):
    rng = np.random.default_rng(random_state)
    w = rng.standard_normal((300, 120)) @ np.diag(rng.pareto(2.0, 120) + 0.5)
    evals = singular_values(w) ** 2
    alpha, xmin, ks, _ = powerlaw_fit(evals)
    ref_alpha, ref_xmin, ref_ks = _ww_style_fit(evals)
    assert alpha == pytest.approx(ref_alpha, rel=1e-10)
    assert xmin == pytest.approx(ref_xmin, rel=1e-12)
    assert ks == pytest.approx(ref_ks, rel=1e-8)


@pytest.mark.parametrize("true_alpha", [2.0, 3.0, 4.5])
def test_alpha_recovers_exact_power_law(true_alpha):
    # eigenvalues at the exact quantiles of a Pareto density p(x) ~ x^-alpha, x >= 1
    n = 3000
    u = (np.arange(n) + 0.5) / n
    evals = (1 - u) ** (-1 / (true_alpha - 1))
    alpha, xmin, ks, n_tail = powerlaw_fit(evals)
    assert alpha == pytest.approx(true_alpha, abs=0.05)
    assert ks < 0.02 and n_tail > n // 2


def test_zero_and_tiny_matrices_do_not_crash():
    m = spectrum_metrics(np.zeros(5))
    assert m["sigma_max"] == 0 and math.isnan(m["erank"]) and m["energy_rank_90"] == 0
    a = powerlaw_fit(np.array([1.0, 2.0]))
    assert math.isnan(a[0])


def test_the_metric_table_defines_every_column_the_tables_and_views_use():
    """METRICS is the one list: spectrum_metrics and the polars schemas follow it, each
    activation-aware metric is its weight metric of another spectrum, and the summary's
    and heatmap's selections name metrics of the table."""
    from spectra.linalg.metrics import HEATMAP, METRICS, SUMMARY, schema

    s = np.sort(np.random.default_rng(3).gamma(2.0, size=60))[::-1]
    weight = spectrum_metrics(s)
    aware = spectrum_metrics(s, aware=True)
    assert list(weight) == list(schema()) == [n for n, m in METRICS.items() if not m.aware]
    assert list(aware) == list(schema(aware=True)) == [n for n, m in METRICS.items() if m.aware]
    assert aware and set(SUMMARY) <= set(METRICS) and set(HEATMAP) <= set(METRICS)
    for name, value in {**weight, **aware}.items():
        assert type(value) is METRICS[name].dtype, name
    for name, m in METRICS.items():
        if m.aware:
            assert aware[name] == weight[m.of] and not METRICS[m.of].aware
    zero = spectrum_metrics(np.zeros(4), aware=True)
    assert zero["calib_energy_rank_90"] == 0 and math.isnan(zero["calib_erank"])
