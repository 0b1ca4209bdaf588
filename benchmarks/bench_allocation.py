"""Budgeted allocation strategies on the demo model: perplexity and allocation time.

    python benchmarks/bench_allocation.py [--max-tokens N] [--only NAME ...] [--plot]

(1) lowrank at 40%, 50%, 60% and 80% of the linear parameters kept, ways of choosing
the ranks: uniform (every module keeps the same fraction of its own parameters),
energy (one energy threshold for all modules, bisected to the budget), weight
(allocation on the squared relative weight error from the spectra), fisher
(allocation on the Fisher-predicted loss, 4096 calibration tokens), ppl (allocation
on the weight error scaled by each module's measured loss increase at lowrank-half,
512 evaluation tokens per module); and the calibrated pair: uniform-whiten (the
uniform ranks, whitened) against calib (whitened ranks allocated on the
calibration-weighted error weighted by each module's output gradients, a loss
estimate compared across all modules; the demo's cached 32,768-token calibration,
gradients on its first 4,096 tokens) and calib-relative (the relative
calibration-weighted error, allocated within each role).
(2) 2.5 and 3 average bits per linear parameter: mixed (lowrank, RTN quant and
magnitude pruning per module, Fisher damage) against quant alone (RTN bits allocated
per module, Fisher damage) and uniform RTN. (3) At exactly the bits of uniform 3-bit
GPTQ (group 128, scales and zero points included): uniform RTN, uniform GPTQ, and the
calibrated allocations quant (GPTQ bits per module) and mixed (whitened lowrank,
GPTQ, Wanda per module), both on the gradient-weighted calibration error (and
-relative: on the relative one, within roles).
Perplexity on the builtin evaluation part (seqlen 512, all of it unless --max-tokens).
Results: benchmarks/results/bench_allocation.json; --plot writes allocation.png.

    python benchmarks/bench_allocation.py --strategies [--only ROW ...]

(4) `plan auto --allocate` side by side at matched parameter budgets (issue 34):
unstructured sparsity 50%, 60%, 70% pruned by Wanda and by SparseGPT, allocated
uniform, owl, alpha, farms and loss; whitened low rank at 50% and 80% kept: uniform,
alpha, farms, loss; GPTQ at 3 bits per parameter on average: uniform, alpha, loss.
A rule strategy (uniform, alpha, farms, owl) sets each module's sparsity, rank or bits;
the pruner, the whitening and GPTQ are then fixed for the row (every module of a Wanda
row is pruned by Wanda at its allocated sparsity). `loss` is plan auto's calibrated
allocation (the loss estimate of the default path), whose prune candidates are Wanda
and SparseGPT: its sparsities are kept and its pruner fixed the same way. e = 0.2
(AlphaPruning's value with Wanda and SparseGPT), owl's band 0.08.
Results: benchmarks/results/bench_strategies.json (each allocation's seconds
included) and strategies.png.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from bench_quality import write_results

from spectra.io.model import open_model
from spectra.plan import run

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
BUDGETS = (0.4, 0.5, 0.6, 0.8)
BITS = (2.5, 3.0)
STRATEGIES = (
    "uniform",
    "energy",
    "weight",
    "fisher",
    "ppl",
    "uniform-whiten",
    "calib",
    "calib-relative",
)


def uniform_plan(mats, ratio: float, whiten: bool = False) -> dict:
    return {
        m.name: {
            "method": "lowrank",
            "rank": max(1, int(ratio * m.shape[0] * m.shape[1] / sum(m.shape))),
            "whiten": whiten,
        }
        for m in mats
    }


def energy_plan(mats, sigmas, ratio: float) -> dict:
    """One energy threshold for every module, the largest that fits the budget."""
    import numpy as np

    from spectra.linalg.metrics import energy_rank

    total = sum(m.shape[0] * m.shape[1] for m in mats)

    def ranks(e):
        out = {}
        for m in mats:
            r = energy_rank(np.asarray(sigmas[m.name]), e)
            if r * sum(m.shape) < m.shape[0] * m.shape[1]:
                out[m.name] = r
        return out

    def params(rs):
        return sum(
            rs[m.name] * sum(m.shape) if m.name in rs else m.shape[0] * m.shape[1] for m in mats
        )

    lo, hi = 0.0, 1.0
    for _ in range(50):
        mid = (lo + hi) / 2
        if params(ranks(mid)) <= ratio * total:
            lo = mid
        else:
            hi = mid
    return {k: {"method": "lowrank", "rank": r} for k, r in ranks(lo).items()}


def rtn_plan(mats, bits: int, gptq: bool = False) -> dict:
    return {
        m.name: {"method": "quant", "bits": bits, "group_size": 128, "gptq": gptq} for m in mats
    }


def auto_layers(method, sensitivity, importance=True, **budget):
    from compressors.base import config_to_dict
    from spectra.plan.auto import auto_plan

    t0 = time.perf_counter()
    result = auto_plan(
        open_model("demo"), method, sensitivity=sensitivity, importance=importance, **budget
    )
    layers = {k: config_to_dict(c) for k, c in result.plan.layers.items()}
    return layers, time.perf_counter() - t0


SPARSITIES = (0.5, 0.6, 0.7)
RANK_KEPT = (0.5, 0.8)


def strategy_rows() -> list[tuple[str, str, str, dict, dict]]:
    """(row, method, strategy, budget, fixed knobs) of part (4), the issue's targets
    first (70% Wanda), so that an interrupted run has measured what matters most."""
    rows = []
    for s in sorted(SPARSITIES, reverse=True):
        for pruner in ("wanda", "sparsegpt"):
            for strat in ("uniform", "owl", "alpha", "farms", "loss"):
                fixed = {"wanda": pruner == "wanda", "sparsegpt": pruner == "sparsegpt"}
                name = f"prune-{s}-{pruner}-{strat}"
                rows.append((name, "prune", strat, dict(target_params=1 - s), fixed))
    for f in RANK_KEPT:
        for strat in ("uniform", "alpha", "farms", "loss"):
            name = f"lowrank-{f}-whiten-{strat}"
            rows.append((name, "lowrank", strat, dict(target_params=f), {"whiten": True}))
    for strat in ("uniform", "alpha", "loss"):
        rows.append((f"gptq-3bit-{strat}", "quant", strat, dict(target_bits=3.0), {"gptq": True}))
    first = [r for r in rows if r[0].startswith("prune-0.7-wanda")]
    return (
        first
        + [r for r in rows if r not in first and not r[0].startswith("prune")]
        + [r for r in rows if r not in first and r[0].startswith("prune")]
    )


def strategy_layers(method: str, strat: str, budget: dict, cache: dict) -> tuple[dict, float]:
    """Allocated layers (module -> settings) and the allocation's seconds (once per
    method, strategy and budget: the Wanda and SparseGPT rows share it)."""
    from compressors.base import config_to_dict
    from spectra.plan.auto import auto_plan
    from spectra.plan.strategies import Strategy

    key = (method, strat, tuple(sorted(budget.items())))
    if key not in cache:
        t0 = time.perf_counter()
        if strat == "loss":
            result = auto_plan(open_model("demo"), method, sensitivity="calib", **budget)
        else:
            # rule strategies: data-free candidates (their cost is all the rule needs)
            result = auto_plan(
                open_model("demo"),
                method,
                sensitivity="none",
                strategy=Strategy(strat, e=0.2),
                **budget,
            )
        layers = {k: config_to_dict(c) for k, c in result.plan.layers.items()}
        cache[key] = (layers, time.perf_counter() - t0, result.plan.allocation)
    return cache[key]


def fix_knobs(layers: dict, fixed: dict) -> dict:
    """Every allocated setting with the row's pruner, whitening or GPTQ (the allocated
    sparsity, rank or bits kept)."""
    out = {}
    for name, c in layers.items():
        c = {k: v for k, v in c.items() if k not in ("wanda", "sparsegpt")} | fixed
        if fixed.get("gptq"):
            c["group_size"] = c.get("group_size") or 128
        out[name] = c
    return out


def run_strategies(args) -> None:
    from spectra.data import calibration
    from spectra.data import perplexity as ev
    from spectra.plan import format as plans
    from spectra.plan import run

    out = RESULTS / "bench_strategies.json"
    model = open_model("demo", "cpu", "float32", "none").load()
    tok = open_model("demo").tokenizer()
    ids = ev.token_stream(tok, "builtin", "eval")
    results = json.loads(out.read_text()) if out.is_file() else {}
    if "dense" not in results:
        base = ev.perplexity(model, tok, ids=ids, max_tokens=args.max_tokens)
        results["dense"] = dict(ppl=base.ppl, tokens=base.tokens)
    grams = calibration.calibrate(open_model("demo"), network=model)
    cache: dict = {}
    for name, method, strat, budget, fixed in strategy_rows():
        if args.only and name not in args.only:
            continue
        if name in results and not args.only:
            continue
        layers, alloc_s, record = strategy_layers(method, strat, budget, cache)
        layers = fix_knobs(layers, fixed)
        plan = plans.parse({"version": 1, "model": "demo", "layers": layers})
        totals = plans.totals(plans.resolve(plan, list(open_model("demo").matrices)))
        t0 = time.perf_counter()
        compressed, _, _ = run.apply_plan(model, plan, grams)
        apply_s = time.perf_counter() - t0
        r = ev.perplexity(compressed, tok, ids=ids, max_tokens=args.max_tokens)
        results[name] = dict(
            ppl=r.ppl,
            tokens=r.tokens,
            method=method,
            strategy=strat,
            budget=budget,
            fixed=fixed,
            params_kept=totals["params_ratio"],
            bits_per_param=totals["bits_per_param"],
            allocation_seconds=alloc_s,
            apply_seconds=apply_s,
            allocation=record,
        )
        print(
            f"{name}: ppl {r.ppl:,.2f}, params {totals['params_ratio']:.4f}, "
            f"{totals['bits_per_param']:.3f} bits, allocation {alloc_s:.1f} s",
            flush=True,
        )
        del compressed
        write_results(out, results)
    write_results(out, results)
    plot_strategies(results, RESULTS / "strategies.png")


def plot_strategies(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), dpi=120)
    for ax, pruner in zip(axes, ("wanda", "sparsegpt"), strict=True):
        for strat in ("uniform", "owl", "alpha", "farms", "loss"):
            pts = [
                (s, results.get(f"prune-{s}-{pruner}-{strat}", {}).get("ppl")) for s in SPARSITIES
            ]
            pts = [(s, y) for s, y in pts if y is not None]
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=strat)
        if "dense" in results:
            ax.axhline(results["dense"]["ppl"], color="gray", ls="--", lw=1, label="dense")
        ax.set_yscale("log")
        ax.set_xlabel(f"sparsity ({pruner})")
        ax.set_ylabel("perplexity (builtin eval)")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.suptitle("SmolLM2-135M: sparsity allocation strategies at matched parameters")
    fig.tight_layout()
    fig.savefig(path)
    print(f"plot: {path}", file=sys.stderr)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--max-tokens", type=int)
    p.add_argument("--only", nargs="*", help="run only these rows (e.g. lowrank-0.5-fisher)")
    p.add_argument("--out", type=Path, default=RESULTS / "bench_allocation.json")
    p.add_argument("--plot", action="store_true", help="only draw allocation.png from --out")
    p.add_argument("--strategies", action="store_true", help="part (4): plan auto --allocate")
    args = p.parse_args()
    if args.strategies and args.plot:
        plot_strategies(
            json.loads((RESULTS / "bench_strategies.json").read_text()), RESULTS / "strategies.png"
        )
        return
    if args.strategies:
        run_strategies(args)
        return
    if args.plot:
        plot(json.loads(args.out.read_text()), RESULTS / "allocation.png")
        return

    from compressors.apply import needs_data
    from spectra.analysis import analyze
    from spectra.data import calibration
    from spectra.data import perplexity as ev
    from spectra.plan import format as plans

    model = open_model("demo", "cpu", "float32", "none").load()
    tok = open_model("demo").tokenizer()
    ids = ev.token_stream(tok, "builtin", "eval")
    mats = [m for m in open_model("demo").matrices if m.role not in plans.NOT_TARGETABLE]
    sigmas = {r["name"]: r["sigma"] for r in analyze(open_model("demo"), with_mpo=False).to_dicts()}
    results = json.loads(args.out.read_text()) if args.out.is_file() else {}
    if "dense" not in results:
        base = ev.perplexity(model, tok, ids=ids, max_tokens=args.max_tokens)
        results["dense"] = dict(ppl=base.ppl, tokens=base.tokens)
    print(f"dense: ppl {results['dense']['ppl']:.3f}", flush=True)

    rows = []
    for f in BUDGETS:
        for s in STRATEGIES:
            rows.append((f"lowrank-{f}-{s}", s, dict(target_params=f)))
    for b in BITS:
        rows += [
            (f"mixed-{b}bit-fisher", "mixed", dict(target_bits=b)),
            (f"quant-{b}bit-fisher", "quant", dict(target_bits=b)),
        ]
    rows += [("rtn-uniform-2bit", "rtn2", {}), ("rtn-uniform-3bit", "rtn3", {})]
    # (3) everything at exactly the bits of uniform 3-bit GPTQ
    matched = plans.totals(
        plans.resolve(plans.parse({"layers": rtn_plan(mats, 3, gptq=True)}), mats)
    )["bits_per_param"]
    rows += [
        ("gptq-uniform-3bit", "gptq3", {}),
        ("quant-matched-calib", "quant-calib", dict(target_bits=matched)),
        ("mixed-matched-calib", "mixed-calib", dict(target_bits=matched)),
        ("quant-matched-calib-relative", "quant-calib-relative", dict(target_bits=matched)),
        ("mixed-matched-calib-relative", "mixed-calib-relative", dict(target_bits=matched)),
    ]
    grams = None  # the calibration cache, read at the first data-aware row

    for name, how, budget in rows:
        if args.only and name not in args.only:
            continue
        if name in results and not args.only:
            continue
        t0 = time.perf_counter()
        if how in ("uniform", "uniform-whiten"):
            layers = uniform_plan(mats, budget["target_params"], how == "uniform-whiten")
        elif how == "energy":
            layers = energy_plan(mats, sigmas, budget["target_params"])
        elif how in ("weight", "calib", "fisher", "ppl", "calib-relative"):
            sens = {"weight": "none", "calib-relative": "calib"}.get(how, how)
            layers, _ = auto_layers("lowrank", sens, how != "calib-relative", **budget)
        elif how in ("mixed", "quant"):
            layers, _ = auto_layers(how, "fisher", **budget)
        elif how.startswith(("mixed-calib", "quant-calib")):
            relative = how.endswith("-relative")
            layers, _ = auto_layers(how.split("-")[0], "calib", not relative, **budget)
        else:
            layers = rtn_plan(mats, int(how[-1]), gptq=how.startswith("gptq"))
        alloc_seconds = time.perf_counter() - t0
        plan = plans.parse({"version": 1, "model": "demo", "layers": layers})
        entries = plans.resolve(plan, mats)
        totals = plans.totals(entries)
        t0 = time.perf_counter()
        data = any(e.config is not None and needs_data(e.config) for e in entries)
        if data and grams is None:
            grams = calibration.calibrate(open_model("demo"), network=model)
        compressed, _, _ = run.apply_plan(model, plan, grams if data else None)
        apply_seconds = time.perf_counter() - t0
        r = ev.perplexity(compressed, tok, ids=ids, max_tokens=args.max_tokens)
        results[name] = dict(
            ppl=r.ppl,
            tokens=r.tokens,
            params_kept=totals["params_ratio"],
            bits_per_param=totals["bits_per_param"],
            compressed_modules=totals["compressed"],
            allocation_seconds=alloc_seconds,
            apply_seconds=apply_seconds,
            methods=sorted({v["method"] for v in layers.values()}),
        )
        print(
            f"{name}: ppl {r.ppl:,.2f}, params {totals['params_ratio']:.3f}, "
            f"{totals['bits_per_param']:.2f} bits, allocation {alloc_seconds:.1f} s",
            flush=True,
        )
        del compressed
        write_results(args.out, results)  # finished rows survive an interruption
    write_results(args.out, results)
    plot(results, RESULTS / "allocation.png")
    print(f"written to {args.out}")


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    for s in STRATEGIES:
        pts = [(f, results.get(f"lowrank-{f}-{s}", {}).get("ppl")) for f in BUDGETS]
        pts = [(f, y) for f, y in pts if y is not None]
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", label=s)
    if "dense" in results:
        ax.axhline(results["dense"]["ppl"], color="gray", ls="--", lw=1, label="dense")
    ax.set_yscale("log")
    ax.set_xlabel("fraction of linear parameters kept (lowrank)")
    ax.set_ylabel("perplexity (builtin eval, seqlen 512)")
    ax.set_title("SmolLM2-135M: rank allocation strategies")
    ax.legend()
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path)
    print(f"plot: {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
