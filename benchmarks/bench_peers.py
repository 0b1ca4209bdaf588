"""Our GPTQ, Wanda and SparseGPT against llm-compressor's, side by side on the demo.

    python benchmarks/bench_peers.py [--only ROW ...] [--peer-python PATH] [--table]

Both sides get the same calibration windows: the default calibration of the demo
(64 windows of 512 tokens from the builtin corpus's calibration part, seed 0), which
this script writes as token ids for the peer. The peer (llm-compressor 0.14, GPTQ
with its symmetric int grid and `actorder: static`, WandaPruningModifier,
SparseGPTModifier; lm_head left alone, 1% damping, blocks of 128) runs its oneshot in
the `peers` environment (`make peers`: .venv-peers, since llm-compressor pins its
own transformers), in a subprocess that never imports spectra, and hands back its
linear weights; both results are then scored by the same perplexity function as
`spectra eval` on all 16,384 evaluation tokens. Our rows apply a plan with every
linear module of the blocks set the same way, with the calibration dense (the
cached Grams) or sequential (`calibration.sequential`: each block on the outputs
of the blocks before it as compressed, as llm-compressor does). Times: our apply
(reading the cached dense calibration, or calibrating sequentially inside it) and
the peer's oneshot call (its calibration included), on the same machine.
Results: benchmarks/results/bench_peers.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_quality import densified, write_results

from spectra.io.model import open_model

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results" / "bench_peers.json"
PEER_PYTHON = REPO / ".venv-peers" / "bin" / "python"
TARGETS = r"re:model\.layers\.\d+\..*"


def quant(
    bits,
    gptq=True,
    act_order=False,
    symmetric=False,
    sequential=False,
    group_size=64,
    observer="minmax",
):
    knobs = dict(method="quant", bits=bits, group_size=group_size, gptq=gptq, symmetric=symmetric)
    knobs["observer"] = observer
    if gptq:
        knobs["act_order"] = act_order
    return knobs, sequential


def prune(kind, sequential=False):
    return dict(method="prune", sparsity=0.5, **{kind: True}), sequential


# one bit width's rows: name (after "w<bits>-") -> quant() settings; "ao" act-order,
# "seq" sequential calibration, "sym" the symmetric grid, "mse" the mse observer.
# Asymmetric at group 128 costs what symmetric costs at 64: 4.25 (3.25) bits.
QUANT_ROWS = {
    "rtn-g64": dict(gptq=False),
    "rtn-g64-sym": dict(gptq=False, symmetric=True),
    "gptq-g64": dict(),
    "gptq-g64-ao": dict(act_order=True),
    "gptq-g64-ao-seq": dict(act_order=True, sequential=True),
    "gptq-g64-sym-ao-seq": dict(act_order=True, symmetric=True, sequential=True),
    "gptq-g64-sym-ao": dict(act_order=True, symmetric=True),
    "gptq-g128-ao-seq": dict(act_order=True, sequential=True, group_size=128),
    "rtn-g64-mse": dict(gptq=False, observer="mse"),
    "gptq-g64-sym-ao-seq-mse": dict(
        act_order=True, symmetric=True, sequential=True, observer="mse"
    ),
    "gptq-g64-ao-seq-mse": dict(act_order=True, sequential=True, observer="mse"),
    "gptq-g64-ao-mse": dict(act_order=True, observer="mse"),
    "gptq-g128-ao-seq-mse": dict(act_order=True, sequential=True, group_size=128, observer="mse"),
}


def bit_rows(bits: int) -> dict:
    """`rtn-w4-g64`-style rows of QUANT_ROWS at `bits`, then the peer's row."""
    rows = {}
    for name, knobs in QUANT_ROWS.items():
        kind, rest = name.split("-", 1)
        rows[f"{kind}-w{bits}-{rest}"] = quant(bits, **knobs)
    rows[f"peer-gptq-w{bits}-g64"] = dict(recipe="gptq", bits=bits, group_size=64)
    return rows


# row -> (our settings, sequential) or the peer's recipe
ROWS = {
    **bit_rows(4),
    **bit_rows(3),
    "wanda-50": prune("wanda"),
    "wanda-50-seq": prune("wanda", sequential=True),
    "peer-wanda-50": dict(recipe="wanda", sparsity=0.5),
    "sparsegpt-50": prune("sparsegpt"),
    "sparsegpt-50-seq": prune("sparsegpt", sequential=True),
    "peer-sparsegpt-50": dict(recipe="sparsegpt", sparsity=0.5),
}


def run_peer(python: Path, windows: Path, recipe: dict, work: Path) -> tuple[dict, float]:
    from safetensors.torch import load_file

    out = work / "peer.safetensors"
    cmd = [str(python), str(REPO / "benchmarks" / "peer_llmcompressor.py")]
    cmd += ["--model", str(demo_root()), "--windows", str(windows), "--out", str(out)]
    for k, v in recipe.items():
        cmd += [f"--{k.replace('_', '-')}", str(v)]
    subprocess.run(cmd, check=True)
    meta = json.loads(Path(f"{out}.json").read_text())
    return load_file(out), meta["seconds"]


def demo_root() -> Path:
    from spectra.io import models

    return models.resolve("demo").root


def peer_bits(recipe: dict, m: int, n: int) -> tuple[int, int]:
    """(params, bits) of the peer's setting, counted as we count ours."""
    from compressors.registry import make_config

    if recipe["recipe"] == "gptq":
        config = make_config(
            "quant", bits=recipe["bits"], group_size=recipe["group_size"], symmetric=True
        )
    else:  # a per-block (SparseGPT) or per-row (Wanda) 50% mask: half the entries
        config = make_config("prune", sparsity=recipe["sparsity"], wanda=True)
    return config.cost(m, n)


def markdown_table(results: dict) -> str:
    lines = [
        "| row | perplexity | bits / param | params kept | time |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, r in results.items():
        if name == "dense":
            lines.append(f"| dense | {r['ppl']:.3f} | 16 | 1.000 | |")
            continue
        lines.append(
            f"| {name} | {r['ppl']:.3f} | {r['bits_per_param']:.3f} | "
            f"{r['params_kept']:.3f} | {r['seconds']:.0f} s |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", nargs="*", help="run only these rows")
    p.add_argument("--peer-python", type=Path, default=PEER_PYTHON)
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--table", action="store_true", help="print the results as a table")
    args = p.parse_args()
    if args.table:
        print(markdown_table(json.loads(args.out.read_text())))
        return
    unknown = set(args.only or ()) - set(ROWS)
    if unknown:
        sys.exit(f"unknown rows: {', '.join(sorted(unknown))} (known: {', '.join(ROWS)})")

    import torch
    from safetensors.torch import save_file

    from compressors.apply import linear_targets
    from spectra.data import calibration
    from spectra.data import perplexity as ev
    from spectra.plan import format as plans
    from spectra.plan import run

    model = open_model("demo", "cpu", "float32", "none").load()
    tok = open_model("demo").tokenizer()
    ids = ev.token_stream(tok, "builtin", "eval")
    spec = calibration.for_model("demo")
    windows = calibration.calibration_windows(tok, spec)
    results = json.loads(args.out.read_text()) if args.out.is_file() else {}
    if "dense" not in results:
        base = ev.perplexity(model, tok, ids=ids)
        results["dense"] = dict(ppl=base.ppl, tokens=base.tokens)
    targets = {n: t for n, (t, _) in linear_targets(model).items() if t.block is not None}
    total = sum(t.shape[0] * t.shape[1] for t in targets.values())
    work = Path(tempfile.mkdtemp(prefix="bench-peers-"))
    save_file({"input_ids": windows.contiguous()}, str(work / "windows.safetensors"))
    grams = None
    for name in args.only or ROWS:  # --only runs in the order given
        row = ROWS[name]
        if name.startswith("peer-"):
            weights, seconds = run_peer(args.peer_python, work / "windows.safetensors", row, work)
            scored = open_model("demo", "cpu", "float32", "none").load()
            mods = dict(scored.named_modules())
            for mod_name, w in weights.items():
                mods[mod_name].weight.data = w.to(mods[mod_name].weight.dtype)
            cost = [peer_bits(row, *targets[n].shape) for n in weights]
            extra = dict(peer="llmcompressor 0.14", modules=len(weights))
        else:
            knobs, sequential = row
            raw = dict(
                version=1,
                model="demo",
                calibration=dict(vars(spec), sequential=sequential),
                rules=[dict(targets=[TARGETS], **knobs)],
            )
            plan = plans.parse(raw)
            entries = plans.resolve(plan, list(targets.values()))
            t0 = time.perf_counter()
            if sequential:
                _, _, facts = run.apply_plan(model, plan, calib_ids=windows)
            else:
                if grams is None and (knobs["method"] == "prune" or knobs.get("gptq")):
                    grams = calibration.calibrate(open_model("demo"), spec, network=model)
                _, _, facts = run.apply_plan(model, plan, grams)
            seconds = time.perf_counter() - t0
            # scored on the reconstructed weights: the same numbers as the compact
            # modules up to float rounding, without the CPU's slow sparse matmul
            scored = densified(model, facts)
            cost = [(e.params_after, e.bits_after) for e in entries if e.config is not None]
            extra = dict(plan=raw["rules"][0], sequential=sequential)
        with torch.no_grad():
            r = ev.perplexity(scored, tok, ids=ids)
        results[name] = dict(
            ppl=r.ppl,
            tokens=r.tokens,
            seconds=seconds,
            params_kept=sum(c[0] for c in cost) / total,
            bits_per_param=sum(c[1] for c in cost) / total,
            **extra,
        )
        print(
            f"{name}: ppl {r.ppl:.3f}, {results[name]['bits_per_param']:.3f} bits, {seconds:.0f} s",
            flush=True,
        )
        del scored
        write_results(args.out, results)
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
