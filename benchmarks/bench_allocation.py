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
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from bench_quality import write_results

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
    result = auto_plan("demo", method, sensitivity=sensitivity, importance=importance, **budget)
    layers = {k: config_to_dict(c) for k, c in result.plan.layers.items()}
    return layers, time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--max-tokens", type=int)
    p.add_argument("--only", nargs="*", help="run only these rows (e.g. lowrank-0.5-fisher)")
    p.add_argument("--out", type=Path, default=RESULTS / "bench_allocation.json")
    p.add_argument("--plot", action="store_true", help="only draw allocation.png from --out")
    args = p.parse_args()
    if args.plot:
        plot(json.loads(args.out.read_text()), RESULTS / "allocation.png")
        return

    from compressors.apply import needs_data
    from spectra.analysis import analyze
    from spectra.data import calibration
    from spectra.data import perplexity as ev
    from spectra.io import models
    from spectra.plan import format as plans

    model = models.load("demo", device="cpu")
    tok = models.load_tokenizer("demo")
    ids = ev.token_stream(tok, "builtin", "eval")
    mats = [m for m in models.matrices("demo") if m.role not in plans.NOT_TARGETABLE]
    sigmas = {r["name"]: r["sigma"] for r in analyze("demo", with_mpo=False).to_dicts()}
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
            grams = calibration.calibrate("demo", model=model, tokenizer=tok)
        compressed, _, _ = plans.apply_plan(model, plan, grams if data else None)
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
