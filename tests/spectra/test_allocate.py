"""Allocation against brute force on small cases."""

import itertools

import numpy as np
import pytest

from spectra.io.model import open_model
from spectra.plan.allocate import BudgetError, Candidate, Unit, allocate, hull
from spectra.plan.candidates import Damage, Module, candidates, units_for
from spectra.plan.grid import Floors


def brute_force(units, budget, key="params"):
    best = None
    for combo in itertools.product(*[u.candidates for u in units]):
        cost = sum(c.cost(key) for c in combo)
        dmg = sum(c.damage for c in combo)
        if cost <= budget and (best is None or dmg < best):
            best = dmg
    return best


def spectral_units(rng, shapes):
    """Every rank 0..min(m, n) of random decaying spectra: cost k (m + n), damage the
    tail sum of sigma^2 (what the greedy over singular values optimizes)."""
    units = []
    for i, (m, n) in enumerate(shapes):
        s = np.sort(rng.uniform(0.1, 3.0, min(m, n)) * np.exp(-rng.uniform(0.05, 0.6)))[::-1]
        tail = np.concatenate([np.cumsum((s**2)[::-1])[::-1], [0.0]])
        cands = [
            Candidate(k, k * (m + n), 16 * k * (m + n), float(tail[k])) for k in range(len(s) + 1)
        ]
        units.append(Unit((f"m{i}",), cands, m * n))
    return units


def test_lowrank_candidates_are_the_truncation_errors():
    import torch

    rng = np.random.default_rng(5)
    w = torch.from_numpy(rng.standard_normal((30, 20)) * np.exp(-0.2 * np.arange(20))).float()
    mod = Module("m", "down", 0, w)
    cands = candidates("lowrank", [mod], Damage(), Floors())
    assert [c.config.rank for c in cands] == list(range(1, (30 * 20 - 1) // 50 + 1))
    u, s, vh = np.linalg.svd(w.double().numpy())
    for c in cands:
        r = c.config.rank
        approx = (u[:, :r] * s[:r]) @ vh[:r]
        want = np.sum((w.double().numpy() - approx) ** 2) / np.sum(w.double().numpy() ** 2)
        assert c.damage == pytest.approx(want, rel=1e-6)
        assert (c.params, c.bits) == (r * 50, 16 * r * 50)
    fisher = Damage(fisher={"m": torch.ones(30, 20)})  # F = 1: half the squared error
    for c in candidates("lowrank", [mod], fisher, Floors()):
        r = c.config.rank
        approx = (u[:, :r] * s[:r]) @ vh[:r]
        want = 0.5 * np.sum((w.double().numpy() - approx) ** 2)
        assert c.damage == pytest.approx(want, rel=1e-4)


def allocations(units, step=2):
    """(budget, chosen) at every budget up to the largest candidates; a budget the
    allocator refuses must be one that brute force cannot meet either."""
    total = sum(u.candidates[-1].params for u in units)
    for budget in range(0, total + 1, step):
        try:
            chosen = allocate(units, budget)
        except BudgetError:
            assert brute_force(units, budget) is None
            continue
        assert sum(c.params for c in chosen) <= budget
        yield budget, chosen


@pytest.mark.parametrize("seed", range(6))
def test_greedy_lowrank_equals_brute_force_with_equal_costs(seed):
    """Equal m + n: the greedy over sigma^2 per parameter is the exact optimum at every
    budget (every unit's steps cost the same, the curves are convex)."""
    rng = np.random.default_rng(seed)
    units = spectral_units(rng, [(9, 7), (8, 8), (10, 6)])
    for budget, chosen in allocations(units):
        assert sum(c.damage for c in chosen) == pytest.approx(brute_force(units, budget), abs=1e-12)


@pytest.mark.parametrize("seed", range(6))
def test_greedy_lowrank_is_exact_where_it_stops_and_never_over_budget(seed):
    """Unequal costs: optimal for the budget the greedy prefix spends (a fractional
    knapsack that ends integral); at any budget, never over it and within one step."""
    rng = np.random.default_rng(100 + seed)
    units = spectral_units(rng, [(9, 5), (6, 8), (12, 4)])
    steps = [max(c.damage for c in u.candidates) for u in units]
    for budget, chosen in allocations(units):
        spent = sum(c.params for c in chosen)
        got = sum(c.damage for c in chosen)
        assert got == pytest.approx(brute_force(units, spent), abs=1e-12)
        assert got <= brute_force(units, budget) + max(steps) + 1e-12


def random_units(rng, n_units=4, n_cands=5):
    units = []
    for i in range(n_units):
        dense = int(rng.integers(40, 80))
        cands = [Candidate(None, dense, 16 * dense, 0.0)]
        for _ in range(n_cands):  # arbitrary, non-convex curves
            p = int(rng.integers(1, dense))
            cands.append(Candidate(f"c{p}", p, 16 * p, float(rng.uniform(0, 10) * (dense - p))))
        units.append(Unit((f"u{i}",), cands, dense))
    return units


def max_hull_step(units, key="params"):
    return max(
        (h[i].damage - h[i + 1].damage)
        for h in (hull(u.candidates, key) for u in units)
        for i in range(len(h) - 1)
    )


@pytest.mark.parametrize("seed", range(8))
def test_lagrangian_never_exceeds_budget_and_is_within_one_step(seed):
    rng = np.random.default_rng(seed)
    units = random_units(rng)
    total = sum(u.params_before for u in units)
    lo = sum(min(c.params for c in u.candidates) for u in units)
    step = max_hull_step(units)
    for budget in range(lo, total + 1, 5):
        chosen = allocate(units, budget)
        assert sum(c.params for c in chosen) <= budget
        opt = brute_force(units, budget)
        got = sum(c.damage for c in chosen)
        assert opt - 1e-9 <= got <= opt + step + 1e-9


def test_hull_is_convex_and_falling():
    rng = np.random.default_rng(7)
    for u in random_units(rng, 10, 12):
        h = hull(u.candidates, "params")
        assert [c.params for c in h] == sorted(c.params for c in h)
        assert all(a.damage > b.damage for a, b in zip(h, h[1:], strict=False))
        slopes = [
            (a.damage - b.damage) / (b.params - a.params) for a, b in zip(h, h[1:], strict=False)
        ]
        assert all(s1 >= s2 - 1e-12 for s1, s2 in zip(slopes, slopes[1:], strict=False))
        # every candidate lies on or above the hull
        xs, ys = [p.params for p in h], [p.damage for p in h]
        for c in u.candidates:
            assert c.params >= xs[0]
            if c.params <= xs[-1]:
                assert c.damage >= np.interp(c.params, xs, ys) - 1e-9


def test_budget_below_reach_is_an_error():
    units = random_units(np.random.default_rng(0))
    lo = sum(min(c.params for c in u.candidates) for u in units)
    with pytest.raises(BudgetError, match=str(lo)):
        allocate(units, lo - 1)


def test_bits_budget_on_quant_and_floors():
    import torch

    g = torch.Generator().manual_seed(0)
    mods = [
        Module(f"model.layers.{i}.mlp.{r}_proj", r, i, torch.randn(64, 48, generator=g))
        for i in range(2)
        for r in ("down", "up")
    ]
    floors = Floors(min_bits={"down": 4})
    units = units_for(mods, "quant", Damage(), floors)
    for u in units:
        bits = [c.config.bits for c in u.candidates if c.config is not None]
        assert min(bits) == (4 if u.role == "down" else 2)
    total = sum(u.params_before for u in units)
    # 48 columns, groups of 128: 2 x 16 bits of scale and zero per row add 2/3 bit
    with pytest.raises(BudgetError):
        allocate(units, int(3.6 * total), "bits")  # the floors need (4 + 2) / 2 + 2/3
    chosen = allocate(units, int(4.2 * total), "bits")
    assert sum(c.bits for c in chosen) <= 4.2 * total
    # more bits where the floor says so; damage falls with bits
    for u, c in zip(units, chosen, strict=True):
        if u.role == "down":
            assert c.config.bits >= 4
    for u in units:
        q = sorted((c for c in u.candidates if c.config is not None), key=lambda c: c.bits)
        assert all(a.damage > b.damage for a, b in zip(q, q[1:], strict=False))


def test_calibration_weighted_lowrank_offers_whitened_ranks_with_their_exact_damage():
    import torch

    from compressors.base import Calibration
    from compressors.registry import compress

    rng = np.random.default_rng(9)
    w = torch.from_numpy(rng.standard_normal((24, 18)) * np.exp(-0.2 * np.arange(18))).float()
    x = torch.from_numpy(rng.standard_normal((300, 18)) * np.linspace(0.1, 3, 18)).float()
    h = x.T @ x
    mod = Module("m", "down", 0, w)
    dmg = Damage(hessian={"m": h})
    u, s, vh = np.linalg.svd(w.double().numpy())
    wd, xd = w.double().numpy(), x.double().numpy()
    cands = candidates("lowrank", [mod], dmg, Floors())
    assert [c.config.rank for c in cands] == list(range(1, 24 * 18 // 42 + 1))
    for c in cands:
        assert c.config.whiten
        built = compress(w.double(), c.config, Calibration.from_activations(x.double()))
        e = wd - built.to_dense().numpy()
        want = np.linalg.norm(e @ xd.T) ** 2 / np.linalg.norm(wd @ xd.T) ** 2
        assert c.damage == pytest.approx(want, rel=1e-4)
        r = c.config.rank  # never worse than the plain truncation at the same rank
        plain = wd - (u[:, :r] * s[:r]) @ vh[:r]
        assert c.damage <= np.linalg.norm(plain @ xd.T) ** 2 / np.linalg.norm(wd @ xd.T) ** 2


@pytest.mark.parametrize(
    "method", ["lowrank", "joint", "losparse", "mpo", "quant", "caldera", "mixed"]
)
@pytest.mark.parametrize("key", ["params", "bits"])
def test_cheapest_from_shapes_is_the_candidates_reach(tiny_llama_dir, method, key):
    """`plan auto` refuses impossible budgets from shapes alone: that bound must be the
    one the real candidates reach, floors and dense modules included."""
    import re

    from spectra.plan.allocate import reachable
    from spectra.plan.auto import load_modules
    from spectra.plan.grid import cheapest

    floors = Floors(
        min_rank={"q": 0.5}, min_bits={"down": 4}, keep_dense=re.compile(r".*\.0\.mlp\..*")
    )
    shapes = [m for m in open_model(str(tiny_llama_dir)).matrices if m.role != "embed"]
    units = units_for(
        load_modules(open_model(str(tiny_llama_dir)).matrices), method, Damage(), floors
    )
    assert cheapest(shapes, method, floors, key) == reachable(units, key)[0]


def test_allocation_by_role_gives_each_role_its_dense_share():
    from spectra.plan.allocate import allocate, allocate_by_role

    def unit(name, role, scale):
        # ranks r = 1..10 of a 100-parameter module: cost 10 r, damage scale / r
        cands = [Candidate(None, 100, 1600, 0.0)] + [
            Candidate(f"r{r}", 10 * r, 160 * r, scale / r) for r in range(1, 10)
        ]
        return Unit((name,), cands, 100, role, 0)

    units = [unit(f"q{i}", "q", 100.0) for i in range(3)] + [
        unit(f"d{i}", "down", 1.0) for i in range(3)
    ]
    budget = 300
    anywhere = allocate(units, budget)
    by_role = allocate_by_role(units, budget)
    spent = lambda chosen, role: sum(  # noqa: E731
        c.params for u, c in zip(units, chosen, strict=True) if u.role == role
    )
    assert spent(anywhere, "q") > 200  # the large q damages take the budget
    assert spent(by_role, "q") <= 150 and spent(by_role, "down") <= 150
    assert sum(c.params for c in by_role) <= budget


def test_calibration_weighted_prune_offers_wanda_and_sparsegpt_with_their_damage():
    import torch

    from compressors.base import Calibration
    from compressors.registry import compress
    from spectra.plan.candidates import candidates

    rng = np.random.default_rng(4)
    w = torch.from_numpy(rng.standard_normal((20, 40))).float()
    x = torch.from_numpy(rng.standard_normal((400, 40)) * np.geomspace(0.05, 4, 40)).float()
    h = (x.T @ x).double()
    mod = Module("m", "down", 0, w)
    dmg = Damage(hessian={"m": h})
    cands = candidates("prune", [mod], dmg, Floors())
    kinds = {(c.config.wanda, c.config.sparsegpt) for c in cands}
    assert kinds == {(True, False), (False, True)}
    total = {"wanda": 0.0, "sparsegpt": 0.0}
    for c in cands:
        built = compress(w, c.config, Calibration(h, 400)).to_dense()
        assert (c.params, c.bits) == c.config.cost(20, 40) == (int(built.count_nonzero()), c.bits)
        assert c.damage == pytest.approx(dmg(mod, w - built), rel=1e-9)
        total["wanda" if c.config.wanda else "sparsegpt"] += c.damage
    assert total["sparsegpt"] < total["wanda"], total
    assert {
        c.config.sparsegpt
        for c in candidates("mixed", [mod], dmg, Floors())
        if c.config.method == "prune"
    } == {False}


@pytest.mark.parametrize("calibrated", [True, False])
def test_prune_offers_the_2_4_pattern_with_exact_cost(calibrated):
    import torch

    from compressors.base import Calibration
    from compressors.registry import compress
    from spectra.plan.candidates import candidates

    rng = np.random.default_rng(5)
    w = torch.from_numpy(rng.standard_normal((12, 32))).float()
    x = torch.from_numpy(rng.standard_normal((300, 32)) * np.geomspace(0.1, 3, 32)).float()
    h = (x.T @ x).double()
    dmg = Damage(hessian={"m": h}) if calibrated else Damage()
    cands = [
        c
        for c in candidates("prune", [Module("m", "down", 0, w)], dmg, Floors())
        if c.config.pattern
    ]
    scorers = {(c.config.wanda, c.config.sparsegpt) for c in cands}
    assert scorers == ({(True, False), (False, True)} if calibrated else {(False, False)})
    for c in cands:
        assert c.config.pattern == "2:4"
        built = compress(w, c.config, Calibration(h, 300) if calibrated else None).to_dense()
        assert (built.reshape(12, 8, 4) != 0).sum(-1).max() <= 2
        assert (c.params, c.bits) == c.config.cost(12, 32) == (12 * 16, 12 * 16 * 18)
        want = dmg(Module("m", "down", 0, w), w - built) if calibrated else None
        if want is not None:
            assert c.damage == pytest.approx(want, rel=1e-9)
    odd = torch.from_numpy(rng.standard_normal((12, 30))).float()  # 30 columns: no 2:4
    assert not [
        c
        for c in candidates("prune", [Module("m", "down", 0, odd)], Damage(), Floors())
        if c.config.pattern
    ]


def test_big_units_are_ranked_alone_and_in_order(monkeypatch):
    """Units of SERIAL_NUMEL elements or more get their candidates one at a time (after
    the small ones, which go one per core), and come back in the modules' order with
    the same candidates."""
    import torch

    from spectra.linalg import parallel

    g = torch.Generator().manual_seed(1)
    mods = [
        Module(f"model.layers.{i}.mlp.{r}_proj", r, i, torch.randn(m, 48, generator=g))
        for i in range(2)
        for r, m in (("down", 64), ("up", 32))
    ]
    ref = units_for(mods, "lowrank", Damage(), Floors())
    monkeypatch.setattr(parallel, "SERIAL_NUMEL", 64 * 48)  # the down_proj units alone
    heard = []
    got = units_for(mods, "lowrank", Damage(), Floors(), progress=lambda *a: heard.append(a[2]))
    assert [u.names for u in got] == [u.names for u in ref]
    assert heard[-2:] == [f"candidates model.layers.{i}.mlp.down_proj" for i in range(2)]
    for a, b in zip(got, ref, strict=True):
        assert [c.damage for c in a.candidates] == pytest.approx([c.damage for c in b.candidates])


def test_a_head_is_ranked_without_the_blocks_grams_beside_it(family_dir):
    """Before the candidates of a module outside the calibration (an untied head), the
    Hessians' held blocks are dropped; a module inside reads its block again after."""
    from spectra.data.calibration import CalibrationSpec, calibrate
    from spectra.plan.auto import load_modules

    spec = str(family_dir("llama"))
    grams = calibrate(open_model(spec, "cpu"), CalibrationSpec(samples=4, seqlen=32))
    hessians = grams.hessians()
    modules = load_modules(open_model(spec).matrices)
    inside = next(m for m in modules if m.name in hessians)
    outside = [m for m in modules if m.name not in hessians]
    assert outside, "the tiny Llama's head is outside the calibration's blocks"
    dmg = Damage(hessian=hessians)
    units_for([inside], "lowrank", dmg, Floors())
    assert len(hessians.held) == 1
    units_for(outside, "lowrank", dmg, Floors())
    assert not hessians.held
    h = hessians[inside.name]
    assert len(hessians.held) == 1 and h.shape[0] == inside.shape[1]
