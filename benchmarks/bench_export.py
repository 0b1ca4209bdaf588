"""Exports of four demo plans: size on disk and perplexity as other engines load them.

    python benchmarks/bench_export.py [--max-tokens N] [--only NAME ...]
    python benchmarks/bench_export.py --engines [llama.cpp transformers vllm width methods]
        [--work DIR] [--redo ROW ...]

Plans (every linear module of the blocks): RTN 4-bit g128 and GPTQ 4-bit g128 (both
on compressed-tensors' symmetric grid, so that the export keeps 4 bits), Wanda 2:4,
and a mixed plan (GPTQ 4-bit g128 on attention, Wanda 2:4 on the MLP). Each is applied
with `spectra apply`, scored by `spectra eval OUT`, then exported with `spectra export`
as compressed-tensors (--dtype float16), GGUF Q8_0 and F16, and hf (--dtype float16); each
export is scored by `spectra eval DIR`, which loads it with transformers (its
compressed-tensors integration, its GGUF loader). Sizes are the export directories'
bytes; the reference is the dense model as an fp16 safetensors checkpoint, and
`linear_ratio` is the compressed modules' stored bytes against their fp16 bytes (the
issue's target for 4-bit g128: at most (4 + 32/128) / 16 plus 2%).
Results: benchmarks/results/bench_export.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from spectra.io.model import open_model

REPO = Path(__file__).resolve().parent.parent
ATTN = r"re:model\.layers\.\d+\.self_attn\.[qkvo]_proj"
MLP = r"re:model\.layers\.\d+\.mlp\.(gate|up|down)_proj"
CALIB = {"corpus": "builtin", "samples": 64, "seqlen": 512, "seed": 0}
RTN4 = dict(method="quant", bits=4, group_size=128, symmetric=True)
GPTQ4 = dict(RTN4, gptq=True)
WANDA24 = dict(method="prune", pattern="2:4", wanda=True)
PLANS = {
    "rtn-4bit-g128": [(ATTN, RTN4), (MLP, RTN4)],
    "gptq-4bit-g128": [(ATTN, GPTQ4), (MLP, GPTQ4)],
    "wanda-2:4": [(ATTN, WANDA24), (MLP, WANDA24)],
    "mixed-gptq4-attn-wanda24-mlp": [(ATTN, GPTQ4), (MLP, WANDA24)],
}
EXPORTS = {  # name -> (format, flags)
    "compressed-tensors": ("compressed-tensors", ["--dtype", "float16"]),
    "gguf-Q8_0": ("gguf", ["--gguf-type", "Q8_0"]),
    "gguf-F16": ("gguf", ["--gguf-type", "F16"]),
    "hf": ("hf", ["--dtype", "float16"]),
}


def spectra(*args, refused_ok: bool = False) -> dict:
    """`spectra ARGS --json` in a subprocess (as a user runs it); its JSON line (with
    `refused_ok`, also when it exits 1: an engine that refused an export)."""
    cmd = [sys.executable, "-m", "spectra.cli", *map(str, args), "--json"]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if r.returncode and not (refused_ok and r.returncode == 1 and r.stdout.strip()):
        raise SystemExit(f"{' '.join(cmd)} failed: {r.stderr.strip().splitlines()[-1]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def size(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def dense_fp16(work: Path) -> int:
    """Bytes of the dense demo as an fp16 safetensors checkpoint (written, then measured)."""
    import torch

    model = open_model("demo", "cpu", "float32", "none").load().to(torch.float16)
    model.save_pretrained(work / "dense-fp16")
    return size(work / "dense-fp16")


GPTQ4_G32 = dict(method="quant", bits=4, group_size=32, symmetric=True, gptq=True)


CHECKED = ("loaded", "ppl", "peak_rss_gb", "file_bytes", "prefill_tok_s", "decode_tok_s",
           "version", "error", "runtime_rss_gb", "weights_bytes", "note", "repacked")  # fmt: skip


def applied(work: Path, name: str, rules: list) -> Path:
    """`spectra apply` of `rules` on the demo (with the benchmark's calibration)."""
    plan = {"version": 1, "model": "demo", "calibration": CALIB, "rules": rules}
    (work / f"{name}.json").write_text(json.dumps(plan))
    spectra("apply", work / f"{name}.json", "--model", "demo", "-o", work / name)
    return work / name


def checked(dest: Path, *flags) -> dict:
    """`spectra serve-check DEST FLAGS`: the engine's row, the fields the docs show."""
    got = spectra("serve-check", dest, *flags, refused_ok=True)[0]
    return {k: got.get(k) for k in CHECKED}


def llama_cpp(work: Path, limit: list) -> dict:
    """GPTQ W4 g32 (symmetric: GGUF's Q4_0 with its own codes) on every block matrix of
    the demo, exported as GGUF with the tied embedding (the demo's only other matrix, a
    fifth of its parameters, which the plan leaves dense) in Q8_0, run by llama.cpp
    itself (`spectra serve-check`) beside the dense model exported as F16 (the size
    reference) and with the same bits by llama.cpp's own quantizer: its round-to-nearest
    Q4_0 of the block matrices, the embedding in Q8_0."""
    gptq = applied(work, "gptq-g32", [{"targets": [ATTN], **GPTQ4_G32},
                                      {"targets": [MLP], **GPTQ4_G32}])  # fmt: skip
    dense = applied(work, "dense", [])
    rows = {}
    for name, out, kind, emb in (("gptq-w4-g32", gptq, "Q4_0", "Q8_0"),
                                 ("dense-F16", dense, "F16", "F16"),
                                 ("dense-Q4_0", dense, "Q4_0", "Q8_0")):  # fmt: skip
        dest = work / f"{name}-gguf"
        summary = spectra("export", out, "--format", "gguf", "--gguf-type", kind,
                          "--gguf-embedding-type", emb, "-o", dest)  # fmt: skip
        rows[name] = dict(
            gguf_type=kind,
            embedding_type=emb,
            stored=sorted({m["stored"] for m in summary["modules"]}),
            bytes=summary["bytes"],
            **checked(dest, "--max-tokens", limit[1]),
        )
    ppl_out = spectra("eval", gptq, "--no-baseline", *limit)["ppl"]
    g, f16, q4 = rows["gptq-w4-g32"], rows["dense-F16"], rows["dense-Q4_0"]
    return dict(
        rows=rows,
        spectra_eval_out_ppl=ppl_out,
        bytes_vs_dense_f16=round(g["bytes"] / f16["bytes"], 4),
        llama_cpp_ppl_vs_spectra_eval=round(g["ppl"] / ppl_out - 1, 6),
        gptq_ppl_vs_llama_cpp_q4_0=round(g["ppl"] / q4["ppl"] - 1, 6),
        targets=dict(bytes_vs_dense_f16=0.36, ppl_vs_spectra_eval=0.005),
    )


def lowrank_hf(work: Path, limit: list) -> dict:
    """Whitened low rank at 50% of the linear parameters (`plan auto`'s defaults on the
    calibration-weighted loss), exported as a compact hf checkpoint in float16 and run in
    transformers (`serve-check --engine transformers`, in float32: this CPU has no fast
    16-bit matmul) beside the dense model exported the same way: bytes on disk, the
    engine's peak RSS, perplexity, prefill and decode tokens/s."""
    plan = work / "lowrank-50.yaml"
    spectra("plan", "auto", "demo", "--method", "lowrank", "--target-params", "0.5", "-o", plan)
    out = work / "lowrank-50"
    spectra("apply", plan, "--model", "demo", "-o", out)
    dense = work / "dense" if (work / "dense").is_dir() else applied(work, "dense", [])
    rows = {}
    for name, src in (("lowrank-50", out), ("dense", dense)):
        dest = work / f"{name}-hf"
        summary = spectra("export", src, "--format", "hf", "--dtype", "float16", "-o", dest)
        rows[name] = dict(
            bytes=summary["bytes"],
            bytes_by_kind=summary.get("bytes_by_kind"),
            **checked(dest, "--engine", "transformers", "--dtype", "float32",
                      "--max-tokens", limit[1]),
        )  # fmt: skip
    ppl_out = spectra("eval", out, "--no-baseline", *limit)["ppl"]
    lr, d = rows["lowrank-50"], rows["dense"]
    return dict(
        rows=rows,
        spectra_eval_out_ppl=ppl_out,
        bytes_vs_dense=round(lr["bytes"] / d["bytes"], 4),
        rss_vs_dense=round(lr["peak_rss_gb"] / d["peak_rss_gb"], 4),
        # the peak less the engine's own runtime (torch and transformers imported)
        rss_above_runtime_vs_dense=round(
            (lr["peak_rss_gb"] - lr["runtime_rss_gb"]) / (d["peak_rss_gb"] - d["runtime_rss_gb"]), 4
        ),
        weights_vs_dense=round(lr["weights_bytes"] / d["weights_bytes"], 4),
        decode_vs_dense=round(lr["decode_tok_s"] / d["decode_tok_s"], 4),
        prefill_vs_dense=round(lr["prefill_tok_s"] / d["prefill_tok_s"], 4),
        ppl_vs_spectra_eval=round(lr["ppl"] / ppl_out - 1, 6),
        targets=dict(bytes_vs_dense=0.65, rss_vs_dense=0.7, decode_vs_dense=1.1),
    )


def vllm(work: Path, limit: list) -> dict:
    """vLLM CPU on the exports it should run: the dense demo (float32), the low-rank
    compact hf export (its transformers backend, remote code), RTN W8 g128 and W4 g128 in
    compressed-tensors (weight-only int8/int4: a kernel this CPU build may lack); each
    row's perplexity beside `spectra eval OUT`."""
    w8 = dict(method="quant", bits=8, group_size=128, symmetric=True)
    outs = {
        "dense": work / "dense" if (work / "dense").is_dir() else applied(work, "dense", []),
        "rtn-w8-g128": applied(work, "rtn-w8", [{"targets": [ATTN], **w8},
                                                {"targets": [MLP], **w8}]),
        "rtn-w4-g128": applied(work, "rtn-w4", [{"targets": [ATTN], **RTN4},
                                                {"targets": [MLP], **RTN4}]),
    }  # fmt: skip
    if (work / "lowrank-50").is_dir():
        outs["lowrank-50"] = work / "lowrank-50"
    rows = {}
    for name, out in outs.items():
        fmt = "hf" if name in ("dense", "lowrank-50") else "compressed-tensors"
        dest = work / f"{name}-vllm"
        spectra("export", out, "--format", fmt, "--dtype", "float32", "-o", dest)
        row = checked(dest, "--engine", "vllm", "--dtype", "float32",
                      "--max-tokens", limit[1])  # fmt: skip
        row["spectra_eval_out_ppl"] = spectra("eval", out, "--no-baseline", *limit)["ppl"]
        if row["ppl"]:
            row["ppl_vs_spectra_eval"] = round(row["ppl"] / row["spectra_eval_out_ppl"] - 1, 6)
        rows[name] = row
        print("vllm", name, json.dumps(row), flush=True)
    return dict(rows=rows, targets=dict(ppl_vs_spectra_eval=0.01))


# width (issue 44): bench_quality's own plans (its calibration, the Fisher-weighted
# allocation), the 80% rows first, uniform's healed row before the allocated one
WIDTH_ROWS = ("dense", "width-loss-80%", "width-uniform-80%", "width-uniform-80%+heal96",
              "width-uniform-90%", "width-uniform-70%", "width-loss-90%", "width-loss-70%",
              "width-loss-80%+heal96")  # fmt: skip
WIDTH_ENGINES = ("llama_cpp", "transformers", "vllm")


def width(work: Path, limit: list, prior: dict, save, only=None) -> dict:
    """Width (issue 44) at 90%, 80% and 70% of the linear parameters (the demo's block
    parameters: its embedding is tied), allocated on the calibrated loss and uniform,
    the 80% rows also healed 96 steps, beside the dense model. Two passes, each resumed
    from what the JSON holds: every row is applied (`spectra apply`, healing included),
    scored by `spectra eval OUT` (the engines' windows, and the whole evaluation part)
    and exported (GGUF Q8_0 with the embedding in Q8_0; hf in float16); then, with
    nothing else compressing beside them, llama.cpp runs the GGUF, transformers and
    vLLM (per-block widths: its DeciLM, natively) the hf export in float32: bytes, the
    engines' perplexity, prefill and decode tokens/s (the fastest of three runs)."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from bench_quality import quality_plans

    rows = {k: dict(v) for k, v in prior.get("rows", {}).items() if k in WIDTH_ROWS}
    plans = None
    names = [n for n in WIDTH_ROWS if not only or n in only or n == "dense"]
    for name in names:  # pass 1: compress, heal, score, export
        out = work / name.replace("%", "").replace("+", "-")
        gg, hf = out.with_name(out.name + "-gguf"), out.with_name(out.name + "-hf")
        if name in rows and all(e in rows[name] for e in WIDTH_ENGINES):
            continue
        if name in rows and gg.is_dir() and hf.is_dir():
            continue
        if plans is None:
            plans = quality_plans(open_model("demo", "cpu", "float32", "none").load())
            plans["dense"] = {"version": 1, "model": "demo", "rules": []}
        plan = plans[name]() if callable(plans[name]) else plans[name]
        (work / f"{out.name}.json").write_text(json.dumps(plan))
        t0 = time.perf_counter()
        spectra("apply", work / f"{out.name}.json", "--model", "demo", "-o", out)
        row = dict(
            apply_seconds=round(time.perf_counter() - t0, 1),
            widths=(plan.get("allocation") or {}).get("widths"),
            spectra_eval_out_ppl=spectra("eval", out, "--no-baseline", *limit)["ppl"],
            ppl_evaluation_part=spectra("eval", out, "--no-baseline")["ppl"],
        )
        for fmt, dest, flags in (("gguf", gg, ["--gguf-type", "Q8_0"]),
                                 ("hf", hf, ["--dtype", "float16"])):  # fmt: skip
            shutil.rmtree(dest, ignore_errors=True)
            row[f"{fmt}_bytes"] = spectra("export", out, "--format", fmt, *flags, "-o", dest)[
                "bytes"
            ]
        shutil.rmtree(out)
        rows[name] = row
        print("width built", name, json.dumps(row), flush=True)
        save(dict(rows=rows))
    for name in names:  # pass 2: the engines, one at a time
        row = rows[name]
        stem = work / name.replace("%", "").replace("+", "-")
        gg, hf = stem.with_name(stem.name + "-gguf"), stem.with_name(stem.name + "-hf")
        for engine, dest, flags in (
            ("llama_cpp", gg, []),
            ("transformers", hf, ["--engine", "transformers", "--dtype", "float32"]),
            # the same hf directory: per-block widths are DeciLM's, which vLLM runs natively
            ("vllm", hf, ["--engine", "vllm", "--dtype", "float32"]),
        ):
            if engine not in row:
                row[engine] = checked(dest, *flags, "--max-tokens", limit[1])
                save(dict(rows=rows))
        print("width", name, json.dumps(row), flush=True)
    return dict(rows=rows, vs_dense=_width_vs_dense(rows),
                targets=dict(bytes=0.85, llama_cpp_decode=1.1))  # fmt: skip


def _width_vs_dense(rows: dict) -> dict:
    """Each width row against the dense row in the same engine."""
    d, out = rows["dense"], {}
    for name, r in rows.items():
        if name == "dense":
            continue
        out[name] = {
            engine: dict(
                bytes=round(r[engine]["file_bytes"] / d[engine]["file_bytes"], 4),
                decode=round(r[engine]["decode_tok_s"] / d[engine]["decode_tok_s"], 4),
                prefill=round(r[engine]["prefill_tok_s"] / d[engine]["prefill_tok_s"], 4),
                ppl_vs_spectra_eval=round(r[engine]["ppl"] / r["spectra_eval_out_ppl"] - 1, 6),
            )
            for engine in WIDTH_ENGINES
            if r.get(engine, {}).get("decode_tok_s") and d.get(engine, {}).get("decode_tok_s")
        }
    return out


# one row per method of bench_quality (its best variant: whitened where it has one) at
# the 50% and 80% rows, cheapest first (a run resumes from the rows already in the JSON)
METHOD_ROWS = tuple(
    f"{m}-{r}" for m in ("prune-wanda", "lowrank-whiten", "joint-whiten", "losparse-whiten",
                         "mpo-whiten-k2") for r in ("50%", "80%")
)  # fmt: skip


def methods(work: Path, limit: list, prior: dict, save) -> dict:
    """Every method of bench_quality at its 50% and 80% rows plus GPTQ W4 g32, beside the
    dense model, in the three engines where the format applies: transformers runs the hf
    export (float16 on disk, compact where the method has a compact form; run in
    float32), llama.cpp the GGUF (F16: it has no factorized layout, so a factorized
    module is written dense; GPTQ g32 in Q4_0 with its own codes, the embedding in Q8_0),
    vLLM the model as it can load it (the plain checkpoint `apply --dense` writes, in
    float32: vLLM runs no compact export; GPTQ as compressed-tensors, which this CPU
    build has no 4-bit kernel for). Each row: bytes on disk, the engine's peak RSS,
    perplexity beside `spectra eval OUT`, prefill and decode tokens/s; `vs_dense` puts
    them against the dense row of the same engine."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from bench_quality import quality_plans

    plans = quality_plans(open_model("demo", "cpu", "float32", "none").load())
    plans["gptq-w4-g32"] = {
        "version": 1, "model": "demo", "calibration": CALIB,
        "rules": [{"targets": [ATTN], **GPTQ4_G32}, {"targets": [MLP], **GPTQ4_G32}],
    }  # fmt: skip
    plans["dense"] = {"version": 1, "model": "demo", "rules": []}
    rows = dict(prior.get("rows", {}))
    for name in ("dense", "gptq-w4-g32", *METHOD_ROWS):
        if name in rows:
            continue
        plan = plans[name]() if callable(plans[name]) else plans[name]
        path, out = work / f"{name}.json", work / name.replace("%", "")
        path.write_text(json.dumps(plan))
        t0 = time.perf_counter()
        spectra("apply", path, "--model", "demo", "-o", out, "--dense")
        row = dict(
            apply_seconds=round(time.perf_counter() - t0, 1),
            spectra_eval_out_ppl=spectra("eval", out, "--no-baseline", *limit)["ppl"],
        )
        hf, gg, ct = (work / f"{out.name}-{k}" for k in ("hf", "gguf", "ct"))
        summary = spectra("export", out, "--format", "hf", "--dtype", "float16", "-o", hf)
        row["hf_bytes_by_kind"] = summary.get("bytes_by_kind")
        row["transformers"] = checked(hf, "--engine", "transformers", "--dtype", "float32",
                                      "--max-tokens", limit[1])  # fmt: skip
        kind, emb = ("Q4_0", "Q8_0") if name.startswith("gptq") else ("F16", "F16")
        summary = spectra("export", out, "--format", "gguf", "--gguf-type", kind,
                          "--gguf-embedding-type", emb, "-o", gg)  # fmt: skip
        row["gguf_stored"] = sorted({m["stored"] for m in summary["modules"]})
        row["llama_cpp"] = dict(checked(gg, "--max-tokens", limit[1]), gguf_type=kind)
        if name.startswith("gptq"):  # vLLM's 4-bit CPU kernel has no float32 path
            spectra("export", out, "--format", "compressed-tensors", "--dtype", "bfloat16",
                    "-o", ct)  # fmt: skip
            row["vllm"] = dict(checked(ct, "--engine", "vllm", "--dtype", "bfloat16",
                                       "--max-tokens", limit[1]),
                               loads="compressed-tensors W4A16 g32", dtype="bfloat16")  # fmt: skip
        else:
            plain = out / "dense" if (out / "dense").is_dir() else hf
            run = ["--engine", "vllm", "--max-tokens", limit[1], "--dtype"]
            row["vllm"] = dict(checked(plain, *run, "float32"), dtype="float32",
                               loads="plain checkpoint (apply --dense)")  # fmt: skip
            if name == "dense":  # the reference of the bfloat16 row above
                row["vllm_bf16"] = dict(checked(plain, *run, "bfloat16"), dtype="bfloat16")
        for d in (out, hf, gg, ct):
            shutil.rmtree(d, ignore_errors=True)
        rows[name] = row
        print("methods", name, json.dumps(row), flush=True)
        save(dict(rows=rows))
    return dict(rows=rows, vs_dense=_vs_dense(rows))


def _vs_dense(rows: dict) -> dict:
    """Each row's bytes, peak RSS, prefill and decode tokens/s against the dense row in
    the same engine, and the engine's perplexity against `spectra eval OUT`."""
    d, out = rows.get("dense"), {}
    for name, r in rows.items():
        if name == "dense" or d is None:
            continue
        out[name] = {}
        for engine in ("transformers", "llama_cpp", "vllm"):
            e, base = r[engine], d[engine]
            if e.get("dtype") == "bfloat16" and "vllm_bf16" in d:  # the same dtype
                base = d["vllm_bf16"]
            ratio = {
                k: round(e[k] / base[k], 4) if e.get(k) and base.get(k) else None
                for k in ("file_bytes", "peak_rss_gb", "prefill_tok_s", "decode_tok_s")
            }
            ratio["ppl_vs_spectra_eval"] = (
                round(e["ppl"] / r["spectra_eval_out_ppl"] - 1, 6) if e.get("ppl") else None
            )
            ratio["error"] = e.get("error")
            out[name][engine] = ratio
    return out


def plot_methods(part: dict, path: Path) -> None:
    """Each methods row against the dense model in the same engine: file bytes and
    decode tokens/s, one panel each, a bar per engine."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    ratios = part.get("vs_dense") or _vs_dense(part["rows"])
    names = list(ratios)
    engines = (("transformers", "transformers (hf)"), ("llama_cpp", "llama.cpp (GGUF)"),
               ("vllm", "vLLM"))  # fmt: skip
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6), dpi=120, sharey=True)
    y = np.arange(len(names))
    panels = (("file_bytes", "file bytes / dense"), ("decode_tok_s", "decode tokens/s / dense"))
    for ax, (key, title) in zip(axes, panels, strict=True):
        for i, (eng, label) in enumerate(engines):
            vals = [ratios[n][eng].get(key) or 0 for n in names]
            ax.barh(y + (i - 1) * 0.27, vals, height=0.27, label=label)
        ax.axvline(1.0, color="gray", lw=1, ls="--")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3, axis="x")
    axes[0].set_yticks(y, names, fontsize=8)
    axes[0].invert_yaxis()
    axes[1].legend(fontsize=8, loc="lower right")
    fig.suptitle("SmolLM2-135M exports in the engines (0: did not run there)", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    print(f"plot: {path}")


ENGINE_TOKENS = 2048
ENGINE_RUNS = {"llama.cpp": llama_cpp, "transformers": lowrank_hf, "vllm": vllm, "width": width,
               "methods": methods}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--max-tokens", type=int)
    p.add_argument("--only", nargs="*", help="plan names (--engines width: its rows)")
    p.add_argument("--engines", nargs="*", choices=list(ENGINE_RUNS),
                   help="only the engine runs (all three without names)")  # fmt: skip
    p.add_argument("--redo", nargs="*", default=[], help="--engines methods/width: rows run again")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks/results/bench_export.json")
    p.add_argument("--work", type=Path, help="a kept working folder (width resumes from it)")
    args = p.parse_args()
    results = json.loads(args.out.read_text()) if args.out.is_file() else {}
    limit = ["--max-tokens", args.max_tokens] if args.max_tokens else []
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-export-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        if args.engines is not None:
            # the engines and `spectra eval OUT` score the same windows: the first
            # ENGINE_TOKENS of the evaluation part unless --max-tokens says otherwise
            limit = limit or ["--max-tokens", ENGINE_TOKENS]
            done = results.setdefault("engines", {})
            for name in args.engines or list(ENGINE_RUNS):
                if name in ("methods", "width"):  # hours: resumes from the rows written

                    def save(part, done=done, name=name):
                        done[name] = part
                        args.out.write_text(json.dumps(results, indent=2) + "\n")

                    prior = done.get(name) or {}
                    for row in args.redo:
                        prior.get("rows", {}).pop(row, None)
                    only = {"only": args.only} if name == "width" else {}
                    done[name] = ENGINE_RUNS[name](work, limit, prior, save, **only)
                    if name == "methods":
                        plot_methods(done[name], REPO / "docs/img/bench/export_methods.png")
                else:
                    done[name] = ENGINE_RUNS[name](work, limit)
                print(name, json.dumps(done[name], indent=2), flush=True)
                args.out.write_text(json.dumps(results, indent=2) + "\n")
            return
        results["dense_fp16_bytes"] = dense_fp16(work)
        for name, rules in PLANS.items():
            if args.only and name not in args.only:
                continue
            plan = {
                "version": 1,
                "model": "demo",
                "calibration": CALIB,
                "rules": [{"targets": [t], **knobs} for t, knobs in rules],
            }
            (work / f"{name}.json").write_text(json.dumps(plan))
            out = work / name.replace(":", "")
            t0 = time.perf_counter()
            applied = spectra("apply", work / f"{name}.json", "--model", "demo", "-o", out)
            row = dict(
                apply_seconds=round(time.perf_counter() - t0, 1),
                bits_per_param=applied.get("bits_per_param"),
                out_bytes=size(out),
                ppl_out=spectra("eval", out, "--no-baseline", *limit)["ppl"],
                exports={},
            )
            for key, (fmt, extra) in EXPORTS.items():
                dest = work / f"{out.name}-{key}"
                summary = spectra("export", out, "--format", fmt, "-o", dest, *extra)
                ppl = spectra("eval", dest, *limit)["ppl"]
                row["exports"][key] = dict(
                    flags=" ".join(extra),
                    bytes=summary["bytes"],
                    vs_dense_fp16=round(summary["bytes"] / results["dense_fp16_bytes"], 4),
                    linear_ratio=(
                        round(summary["compressed_bytes"] / summary["compressed_fp16_bytes"], 4)
                        if "compressed_bytes" in summary
                        else None
                    ),
                    stored=sorted({m["stored"] for m in summary["modules"]}),
                    seconds=summary["seconds"],
                    ppl=ppl,
                    ppl_vs_out=round(ppl / row["ppl_out"] - 1, 6),
                )
                shutil.rmtree(dest)
            shutil.rmtree(out)
            results[name] = row
            print(name, json.dumps(row), flush=True)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(results, indent=2) + "\n")
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
