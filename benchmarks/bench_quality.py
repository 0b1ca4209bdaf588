"""Perplexity of every compressor on the demo model at matched budgets.

    python benchmarks/bench_quality.py [--max-tokens N] [--only NAME ...]

Dense baseline first, then (1) about 2.4 bits per linear parameter: CALDERA (Q at 2
bits + rank 32 at 4-bit factors) vs 2-bit GPTQ vs 2-bit RTN, with 3- and 4-bit RTN
for reference; (2) 50% and 80% of linear parameters kept: lowrank, whitened lowrank,
joint (q,k and gate,up groups), losparse (half the budget low-rank, half sparse),
mpo, magnitude and Wanda pruning, SparseGPT, and the 2:4 pattern of all three.
Perplexity on the builtin evaluation part (seqlen 512, all of it unless --max-tokens),
calibration from the builtin calibration part (64 x 512 tokens). Each plan is
explicit per module; the wall time of each apply is recorded. The data-aware rows in
SEQUENTIAL run again as NAME-seq with `calibration.sequential` (each block
calibrated on the already compressed ones). MPO models are scored through their
cores' dense reconstruction (the same function; the contraction forward at bonds
this large is ~25x slower than dense on a CPU). Results: benchmarks/results/bench_quality.json.
Rows run together whose plans differ only in `heal:` compress once: each later one
heals a copy of the first one's compressed model (its apply time is the first's).
A plain PyTorch distillation loop is timed beside the first +heal row, every healed
row on cuda, and every healed row with --plain-loop (the healing throughput target).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

from spectra.io.model import open_model

REPO = Path(__file__).resolve().parent.parent
CALIB = {"corpus": "builtin", "samples": 64, "seqlen": 512, "seed": 0}
BLOCK_LINEARS = r"re:model\.layers\.\d+\.(self_attn\.[qkvo]|mlp\.(gate|up|down))_proj"


def write_results(path: Path, results: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")


def linears(model):
    from compressors.apply import linear_targets

    return [t for t, _ in linear_targets(model).values()]


def per_module(model, make) -> dict:
    """A plan with one explicit `layers:` entry per linear module."""
    return {
        "version": 1,
        "model": "demo",
        "calibration": CALIB,
        "layers": {t.name: make(*t.shape) for t in linears(model)},
    }


def rank_for(m, n, ratio):
    return max(1, min(min(m, n), int(ratio * m * n / (m + n))))


def quality_plans(model) -> dict[str, dict]:
    out = {
        "caldera-2bit-r32": per_module(
            model,
            lambda m, n: dict(method="caldera", rank=32, bits=2, factor_bits=4, group_size=64),
        ),
        "gptq-2bit": per_module(
            model, lambda m, n: dict(method="quant", bits=2, group_size=64, gptq=True)
        ),
        # CALDERA as in the paper: Q on QuIP#'s E8P codebook (2.03 bits), 4-bit L R;
        # 4 outer iterations (20 for the scalar row): one E8P LDLQ of a 1536 x 576
        # layer takes ~2 s here, so 20 would cost ~100 min on the demo
        "caldera-e8p-r32": per_module(
            model,
            lambda m, n: dict(
                method="caldera", rank=32, factor_bits=4, group_size=64, quantizer="e8p", iters=4
            ),
        ),
        "quip-sharp-2bit": per_module(  # GPTQ on E8P with the incoherence rotations
            model, lambda m, n: dict(method="quant", bits=2, gptq=True, quantizer="e8p")
        ),
        "rtn-2bit": per_module(model, lambda m, n: dict(method="quant", bits=2, group_size=64)),
        "rtn-3bit": per_module(model, lambda m, n: dict(method="quant", bits=3, group_size=64)),
        "gptq-3bit": per_module(
            model, lambda m, n: dict(method="quant", bits=3, group_size=64, gptq=True)
        ),
        "rtn-4bit": per_module(model, lambda m, n: dict(method="quant", bits=4, group_size=64)),
    }
    for ratio in (0.5, 0.8):
        tag = f"{int(ratio * 100)}%"
        out[f"lowrank-{tag}"] = per_module(
            model, lambda m, n, r=ratio: dict(method="lowrank", rank=rank_for(m, n, r))
        )
        out[f"lowrank-whiten-{tag}"] = per_module(
            model, lambda m, n, r=ratio: dict(method="lowrank", rank=rank_for(m, n, r), whiten=True)
        )
        out[f"joint-{tag}"] = joint_plan(model, ratio)
        out[f"joint-whiten-{tag}"] = joint_plan(model, ratio, whiten=True)
        for white in (False, True):
            out[f"losparse{'-whiten' if white else ''}-{tag}"] = per_module(
                model,
                lambda m, n, r=ratio, white=white: dict(
                    method="losparse", rank=rank_for(m, n, r / 2), sparsity=1 - r / 2, whiten=white
                ),
            )
        out[f"mpo-{tag}"] = per_module(
            model, lambda m, n, r=ratio: dict(method="mpo", cores=3, bond_dim=mpo_bond(m, n, r))
        )
        out[f"mpo-whiten-k2-{tag}"] = per_module(  # two cores: a sum of Kronecker products
            model,
            lambda m, n, r=ratio: dict(
                method="mpo", cores=2, bond_dim=mpo_bond(m, n, r - 1 / m, 2), whiten=True
            ),
        )
        for sweeps in (0, 2):  # the input scaling alone, then with the H-weighted sweeps
            out[f"mpo-whiten-s{sweeps}-{tag}"] = per_module(
                model,
                lambda m, n, r=ratio, s=sweeps: dict(
                    method="mpo",
                    cores=3,
                    bond_dim=mpo_bond(m, n, r - 1 / m),  # the n input scales fit the budget
                    whiten=True,
                    sweeps=s,
                ),
            )
        out[f"prune-magnitude-{tag}"] = per_module(
            model, lambda m, n, r=ratio: dict(method="prune", sparsity=round(1 - r, 6))
        )
        out[f"prune-wanda-{tag}"] = per_module(
            model, lambda m, n, r=ratio: dict(method="prune", sparsity=round(1 - r, 6), wanda=True)
        )
    out["mpo-whiten-k2-30%-4bit"] = per_module(  # CompactifAI's proportions: MPO + int4
        model,
        lambda m, n: dict(
            method="mpo",
            cores=2,
            bond_dim=mpo_bond(m, n, 0.3 - 1 / m, 2),
            whiten=True,
            factor_bits=4,
        ),
    )
    out["prune-sparsegpt-50%"] = per_module(
        model, lambda m, n: dict(method="prune", sparsity=0.5, sparsegpt=True)
    )
    for kind in ("magnitude", "wanda", "sparsegpt"):  # semi-structured 2:4
        knobs = {} if kind == "magnitude" else {kind: True}
        out[f"prune-{kind}-2:4"] = per_module(
            model, lambda m, n, k=knobs: dict(method="prune", pattern="2:4", **k)
        )
    for ratio in WIDTH_RATIOS:  # width beside whitened low rank at the same parameters
        tag = f"{int(ratio * 100)}%"
        if f"lowrank-whiten-{tag}" not in out:
            out[f"lowrank-whiten-{tag}"] = per_module(
                model,
                lambda m, n, r=ratio: dict(method="lowrank", rank=rank_for(m, n, r), whiten=True),
            )
        for how in ("uniform", "loss", "erank"):  # made when selected: they read the calibration
            out[f"width-{how}-{tag}"] = lambda r=ratio, h=how: width_plan(r, h)
    for name in SEQUENTIAL:  # the same plan, each block calibrated on the compressed ones
        out[f"{name}-seq"] = dict(out[name], calibration=dict(CALIB, sequential=True))
    for name in HEALED:  # the same plan, then healed
        out[f"{name}+heal"] = dict(out[name], heal=HEAL)
    for name in HEALED_WIDTH:  # width's rows and their low-rank reference, on the 96 steps
        raw = out[name]
        out[f"{name}+heal96"] = (
            (lambda raw=raw: dict(raw(), heal=HEAL_96))
            if callable(raw)
            else dict(raw, heal=HEAL_96)
        )
    for name in HEALED_LONG:  # the same plan, healed six times longer
        out[f"{name}+heal{HEAL_LONG['steps']}"] = dict(out[name], heal=HEAL_LONG)
    for name in HEALED_FLOAT:  # quantized factors trained in float, rounded at the end
        out[f"{name}+heal-float"] = dict(out[name], heal=dict(HEAL, ste=False))
    for name in (*HEALED_FLOAT, "mpo-whiten-k2-50%"):  # ten times the lr: through a
        # grid, 1e-5 seldom moves a 4-bit code in 8 steps; MPO cores move slowly at it
        out[f"{name}+heal-lr1e-4"] = dict(out[name], heal=dict(HEAL, lr=1e-4))
    for name in HEALED_GPU:  # the same plan, healed fifty times longer (on a GPU)
        out[f"{name}+heal{HEAL_GPU['steps']}"] = dict(out[name], heal=HEAL_GPU)
    for budget, rows in (
        (HEAL_LONG, HEALED_LONG_LR),
        (HEAL_96, HEALED_96_LR),
        (HEAL_GPU, HEALED_GPU_LR),
    ):
        for name, lrs in rows.items():  # the longer budgets at chosen lrs (MPO cores: higher)
            for lr in lrs:
                out[f"{name}+heal{budget['steps']}-lr{lr:.0e}".replace("e-0", "e-")] = dict(
                    out[name], heal=dict(budget, lr=lr)
                )
    return out


# healing budget of the +heal rows: 8 steps of 2048 calibration tokens (16,384 tokens,
# half the calibration set), KL from the dense model, lr 1e-5 (1e-4 and 3e-5 overshoot:
# the first AdamW steps move every factor entry by about lr); ~35-50 s a step here
HEAL = dict(
    steps=8,
    tokens_per_step=2048,
    seqlen=512,
    lr=1e-5,
    warmup=2,
    eval_every=2,
    eval_tokens=2048,
    checkpoint_every=0,
)
# the longer budget of the +heal48 rows: 48 steps (98,304 tokens, three passes over
# the calibration part), the same lr, a curve point every 8 steps
HEAL_LONG = dict(HEAL, steps=48, warmup=4, eval_every=8)
# rows with quantized factors, healed also without the straight-through estimator
HEALED_FLOAT = ("mpo-whiten-k2-30%-4bit", "caldera-e8p-r32")
HEALED_LONG = (
    "joint-whiten-50%",
    "losparse-whiten-80%",
    "mpo-whiten-k2-50%",
    "losparse-whiten-50%",
)
# MPO rows on the 48-step budget at ten times the lr
HEALED_LONG_LR = {"mpo-whiten-s2-80%": (1e-4,)}
# the CPU budget of about 100 steps (the +heal96 rows: 196,608 tokens, six
# passes over the calibration part), for 80% rows whose shorter curves still fell
HEAL_96 = dict(HEAL, steps=96, warmup=8, eval_every=16)
HEALED_96_LR = {"mpo-whiten-s2-80%": (1e-4,), "lowrank-whiten-80%": (1e-5,)}
# the GPU budget of the +heal400 rows (run with --device cuda where a GPU is lent):
# 400 steps (819,200 tokens, about 25 passes over the calibration part), warmup 20
HEAL_GPU = dict(HEAL, steps=400, warmup=20, eval_every=50)
HEALED_GPU = ("joint-whiten-50%", "losparse-whiten-80%", "lowrank-whiten-80%", "mpo-whiten-k2-50%")
# MPO rows on the GPU budget at ten and thirty times the lr (8 CPU steps at 1e-4 cut the
# 50% row's perplexity 4.2x where 1e-5 cut it 2.3x)
HEALED_GPU_LR = {"mpo-whiten-k2-50%": (1e-4, 3e-4), "mpo-whiten-k2-30%-4bit": (1e-4,)}
HEALED = (
    "lowrank-whiten-80%",
    "losparse-whiten-80%",
    "lowrank-whiten-50%",
    "losparse-whiten-50%",
    "joint-whiten-50%",
    "joint-whiten-80%",
    "mpo-whiten-s2-80%",
    "mpo-whiten-k2-50%",
    "caldera-2bit-r32",
    "mpo-whiten-k2-30%-4bit",
    "caldera-e8p-r32",
)


# width (issue 44) at 90%, 80% and 70% of the linear parameters (on the demo, whose
# embedding is tied, the block parameters): uniform, allocated on the calibrated loss,
# by erank; beside whitened low rank at the same parameters; the 80% rows healed 96 steps
WIDTH_RATIOS = (0.9, 0.8, 0.7)
HEALED_WIDTH = ("width-uniform-80%", "width-loss-80%")  # low rank: lowrank-whiten-80%+heal96-lr1e-5


def width_plan(ratio: float, how: str) -> dict:
    """`plan auto --method width --allocate HOW --target-params RATIO` on the demo."""
    from spectra.data import calibration
    from spectra.plan import format as plans
    from spectra.plan import width_auto
    from spectra.plan.sensitivity import importance_of

    demo = open_model("demo")
    grams = calibration.calibrate(demo, calibration.CalibrationSpec(**CALIB))
    importance = importance_of(demo, grams) if how == "loss" else None  # as plan auto
    plan, _ = width_auto.width_plan(demo, ratio, how, grams, importance=importance)
    return dict(plans.to_dict(plan), model="demo", calibration=CALIB)


# data-aware rows also run with sequential calibration (GPTQ, Wanda, SparseGPT: bench_peers)
SEQUENTIAL = (
    "lowrank-whiten-50%",
    "lowrank-whiten-80%",
    "joint-whiten-50%",
    "joint-whiten-80%",
    "losparse-whiten-50%",
    "losparse-whiten-80%",
    "mpo-whiten-s2-80%",
    "caldera-2bit-r32",
)


def mpo_bond(m, n, ratio, cores=3):
    from spectra.linalg import mpo

    return max(1, mpo.chi_for_ratio(mpo.factorize(m, cores), mpo.factorize(n, cores), ratio))


def joint_plan(model, ratio, whiten=False):
    """q,k and gate,up share a factor per block; v, o, down get low-rank at the ratio
    (everything whitened with `whiten`)."""
    ts = {t.name: t for t in linears(model)}
    blocks = sorted({t.block for t in ts.values() if t.block is not None})
    rules = []
    for b in blocks:
        for parent, members in (
            (f"model.layers.{b}.self_attn", ("q_proj", "k_proj")),
            (f"model.layers.{b}.mlp", ("gate_proj", "up_proj")),
        ):
            shapes = [ts[f"{parent}.{x}"].shape for x in members]
            n, total_m = shapes[0][1], sum(s[0] for s in shapes)
            k = max(1, int(ratio * sum(m * n for m, _ in shapes) / (n + total_m)))
            rules.append(
                {
                    "targets": [f"{parent}.{x}" for x in members],
                    "method": "joint",
                    "rank": k,
                    "whiten": whiten,
                }
            )
    plan = per_module(
        model, lambda m, n: dict(method="lowrank", rank=rank_for(m, n, ratio), whiten=whiten)
    )
    for name in list(plan["layers"]):
        if name.rsplit(".", 1)[1] in ("q_proj", "k_proj", "gate_proj", "up_proj"):
            del plan["layers"][name]
    plan["rules"] = rules
    return plan


def compression_key(raw: dict) -> str:
    """What a row compresses: its plan without the healing."""
    return json.dumps({k: v for k, v in raw.items() if k != "heal"}, sort_keys=True)


def densified(model, facts):
    """A copy of `model` whose compressed modules hold their reconstructed dense weights."""
    import torch

    dense = copy.deepcopy(model)
    for name, f in facts.items():
        dense.get_submodule(name).weight.data = f.to_dense().to(torch.float32)
    return dense


def deep_copy(obj):
    """A deep copy of `obj`, or None where it holds tensors that cannot be deep-copied
    (CSR tensors on cuda: LoSparse's sparse parts there)."""
    try:
        return copy.deepcopy(obj)
    except RuntimeError:
        return None


def plain_steps(student, teacher, facts, tok, config, steps=3) -> float | None:
    """Tokens/s of a plain PyTorch distillation loop (F.kl_div on log-softmaxes, AdamW)
    training the same parameters of a copy of `student` on the same batches: what the
    healing loop's throughput is measured against. None where the copy cannot be made."""
    import torch
    import torch.nn.functional as F

    from compressors.healing import Trainable
    from spectra.data import heal

    copied = deep_copy({"s": student, "f": facts})
    if copied is None:
        return None
    params = list(Trainable(copied["s"], copied["f"]).named_parameters().values())
    opt = torch.optim.AdamW(params, lr=config.lr)
    windows = heal.train_windows(tok, config, "builtin")
    device = next(student.parameters()).device
    cuda = device.type == "cuda"  # bf16 autocast there, as healing does
    t0 = time.perf_counter()
    for step in range(steps):
        x = windows[heal.batch_indices(step, config.batch, windows.shape[0], config.seed)]
        x = x.to(device)
        with torch.no_grad(), torch.autocast("cuda", torch.bfloat16, enabled=cuda):
            target = F.log_softmax(teacher(x).logits.flatten(0, 1).float(), -1)
        with torch.autocast("cuda", torch.bfloat16, enabled=cuda):
            logits = F.log_softmax(copied["s"](x).logits.flatten(0, 1).float(), -1)
            loss = F.kl_div(logits, target, log_target=True, reduction="batchmean")
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, config.clip)
        opt.step()
        float(loss.detach())  # waits for the device, as healing's loss record does
    return steps * config.tokens_per_step / (time.perf_counter() - t0)


def plot_heal(results: dict, path: Path) -> None:
    """Evaluation perplexity (2048 tokens) against healing steps, one line per +heal row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9.5, 4.8), dpi=120)
    # one colour per compressed configuration, one line style and marker per budget
    colours: dict = {}  # configuration -> colour index
    drawn: dict = {}  # configuration -> curves drawn so far
    styles = (("-", "o"), ("--", "s"), (":", "^"), ("-.", "D"), ((0, (5, 1)), "v"))
    for name, r in results.items():
        curve = [p for p in r.get("heal", {}).get("curve", []) if not p.get("requantized")]
        if curve:
            base = name.split("+")[0]
            colour = plt.cm.tab10(colours.setdefault(base, len(colours)) % 10)
            ls, marker = styles[drawn.get(base, 0) % len(styles)]
            drawn[base] = drawn.get(base, 0) + 1
            steps, ppl = [p["step"] for p in curve], [p["ppl"] for p in curve]
            ax.plot(steps, ppl, ls=ls, marker=marker, ms=4, color=colour, label=name)
    if "ppl_heal_eval" in results.get("dense", {}):  # the dense model on the same tokens
        ax.axhline(results["dense"]["ppl_heal_eval"], color="gray", ls="--", lw=1, label="dense")
    ax.set_yscale("log")
    ax.set_xlabel("healing step (2048 calibration tokens each)")
    ax.set_ylabel("perplexity (first 2048 eval tokens)")
    gpus = {r["gpu"] for r in results.values() if r.get("gpu")}
    ax.set_title("SmolLM2-135M: healing curves" + (f" on {', '.join(gpus)}" if gpus else ""))
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path)
    print(f"plot: {path}")


def markdown_table(results: dict) -> str:
    rows = [
        "| configuration | params kept | bits / param | perplexity | apply time |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, r in results.items():
        ppl = f"{r['ppl']:,.2f}"
        if "ppl_unhealed" in r:
            ppl = f"{r['ppl_unhealed']:,.2f} -> {ppl}"
        rows.append(
            f"| {name} | {r['params_kept']:.3f} | {r['bits_per_param']:.2f} | "
            f"{ppl} | {r['apply_seconds']:.0f} s |"
        )
    return "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--max-tokens", type=int)
    p.add_argument("--only", nargs="*", help="run only these configurations")
    p.add_argument(
        "--out", type=Path, default=REPO / "benchmarks" / "results" / "bench_quality.json"
    )
    p.add_argument(
        "--table", action="store_true", help="print the results file as a markdown table"
    )
    p.add_argument("--plot", type=Path, help="plot the +heal rows' curves of the results file")
    p.add_argument("--device", default="cpu", help="cpu (the recorded rows), cuda or auto")
    p.add_argument("--deadline", type=float, help="start no further row after this many seconds")
    p.add_argument(
        "--plain-loop",
        action="store_true",
        help="time a plain PyTorch loop beside every healed row (else the first; all on cuda)",
    )
    args = p.parse_args()
    if args.table:
        print(markdown_table(json.loads(args.out.read_text())))
        return
    if args.plot:
        plot_heal(json.loads(args.out.read_text()), args.plot)
        return

    import torch

    from compressors.apply import needs_data
    from spectra.data import calibration, heal
    from spectra.data import perplexity as ev
    from spectra.io import models
    from spectra.plan import format as plans
    from spectra.plan import run
    from spectra.plan.block_plan import heads_of

    started = time.perf_counter()
    device = models.resolve_device(args.device)
    cuda = device.startswith("cuda")
    model = open_model("demo", device, "float32", "none").load()
    tok = open_model("demo").tokenizer()
    ids = ev.token_stream(tok, "builtin", "eval")
    grams = None  # the calibration cache, read (or computed) at the first data-aware row
    results = json.loads(args.out.read_text()) if args.out.is_file() and args.only else {}
    base = ev.perplexity(model, tok, ids=ids, max_tokens=args.max_tokens)
    results["dense"] = dict(
        ppl=base.ppl, tokens=base.tokens, bits_per_param=16.0, params_kept=1.0, apply_seconds=0.0
    )
    print(f"dense: ppl {base.ppl:.3f} on {base.tokens} tokens", flush=True)
    if not args.only or any("+heal" in n for n in args.only):
        curve_ref = ev.perplexity(model, tok, ids=ids, max_tokens=HEAL["eval_tokens"])
        results["dense"]["ppl_heal_eval"] = curve_ref.ppl  # what the curves' points see
    selected = {
        n: raw() if callable(raw) else raw  # width's: allocated only when selected
        for n, raw in quality_plans(model).items()
        if not args.only or n in args.only
    }
    kept = None  # (plan key, {"c": model, "f": facts} copied before healing, reports, s, row)
    for i, (name, raw) in enumerate(selected.items()):
        if args.deadline and time.perf_counter() - started > args.deadline:
            print(f"{name}: not started (past --deadline)", flush=True)
            continue
        plan = plans.parse(raw)
        entries = plans.resolve(plan, linears(model), heads=heads_of(model.config))
        data = any(needs_data(e.config) or needs_data(e.width) for e in entries)
        key = compression_key(raw)
        extra = {}
        t0 = time.perf_counter()
        spec = calibration.CalibrationSpec(**CALIB)
        if kept is not None and kept[0] == key:  # only the healing differs: compressed once
            copied = copy.deepcopy(kept[1])
            compressed, facts, reports, seconds = copied["c"], copied["f"], kept[2], kept[3]
            print(f"{name}: the compression of {kept[4]} ({seconds:.0f} s)", flush=True)
            extra["compression_of"] = kept[4]
        elif plan.calibration.sequential:  # calibrated inside the apply, block by block
            windows = calibration.calibration_windows(tok, spec)
            compressed, reports, facts = run.apply_plan(model, plan, calib_ids=windows)
        else:
            if data and grams is None:
                grams = calibration.calibrate(open_model("demo"), spec, network=model)
            compressed, reports, facts = run.apply_plan(model, plan, grams if data else None)
        if kept is None or kept[0] != key:
            seconds = time.perf_counter() - t0
            later = [compression_key(r) for r in list(selected.values())[i + 1 :]]
            kept = None
            if plan.heal is not None and key in later:  # a later row heals it differently
                pristine = deep_copy({"c": compressed, "f": facts})
                kept = pristine and (key, pristine, reports, seconds, name)
        scored = compressed
        if name.startswith("mpo"):
            # the MPO forward with bonds this large costs ~25x a dense matmul on the CPU
            # (about 44 MFLOP per token for a 1536 x 576 layer); its reconstruction gives
            # the same perplexity up to float rounding, in a fraction of the time
            scored = densified(model, facts)
        if plan.heal is not None:
            unhealed = ev.perplexity(scored, tok, ids=ids, max_tokens=args.max_tokens)
            if cuda or args.plain_loop or name == f"{HEALED[0]}+heal":
                plain = plain_steps(compressed, model, facts, tok, plan.heal)
                if plain is not None:
                    extra["plain_tokens_per_s"] = plain
            facts, healed = heal.heal(compressed, model, facts, tok, plan.heal)
            extra.update(
                device=device,
                gpu=torch.cuda.get_device_name(0) if cuda else None,
                ppl_unhealed=unhealed.ppl,
                heal=dict(settings=plan.heal.to_dict(), **healed.to_dict()),
                heal_seconds=healed.seconds,
            )
            print(
                f"{name}: unhealed {unhealed.ppl:.3f}, healed {healed.steps} steps in "
                f"{healed.seconds:.0f} s ({healed.tokens_per_s:.0f} tokens/s)",
                flush=True,
            )
            scored = densified(model, facts) if name.startswith("mpo") else compressed
        r = ev.perplexity(scored, tok, ids=ids, max_tokens=args.max_tokens)
        before = sum(e.params_before for e in entries)
        after_p = sum(e.params_after for e in entries)
        after_b = sum(e.bits_after for e in entries)
        results[name] = dict(
            ppl=r.ppl,
            tokens=r.tokens,
            apply_seconds=seconds,
            params_kept=after_p / before,
            bits_per_param=after_b / before,
            median_rel_error=(
                sorted(x.rel_error for x in reports)[len(reports) // 2] if reports else None
            ),
            **extra,
        )
        print(
            f"{name}: ppl {r.ppl:.3f}, params kept {after_p / before:.3f}, "
            f"{after_b / before:.2f} bits/param, apply {seconds:.0f} s",
            flush=True,
        )
        del compressed
        write_results(args.out, results)  # finished rows survive an interruption
    write_results(args.out, results)
    print(f"written to {args.out}")
    assert math.isfinite(base.ppl)


if __name__ == "__main__":
    main()
