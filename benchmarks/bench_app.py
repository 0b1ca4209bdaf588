"""Server-side speed of the app's live previews on the demo model.

    python benchmarks/bench_app.py

(1) Editing a low-rank row: the Plan page rerun (Streamlit AppTest, in process, so
the time is the server's script run) after the rank of the selected module changes,
and the error lookup alone (cached spectrum -> Eckart-Young error). Targets: the
error shows in under 100 ms of server time.
(2) Perplexity preview at 2048 tokens: the first preview (dense baseline plus one
module), then one module changed at a time in blocks 0, 10, 20 and 29 (blocks before
the changed one replay their recorded outputs). Target: under 5 s after the first.
(3) The first hour's default path (issue 32): the Plan page's Auto-allocate with its
defaults (whitened low rank at 80% of the parameters on the calibration-weighted loss
estimate of a 4,096-token calibration), which computes the calibration (or reads it),
allocates, and builds the plan's modules into the previews' store; then the first
preview at 2048 tokens, which only evaluates. Target: first preview <= 30 s.

    python benchmarks/bench_app.py [--only row_edit previews default_path]

Results: benchmarks/results/bench_app.json (sections merged with earlier runs).
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

from spectra.io.model import open_model

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "benchmarks" / "results" / "bench_app.json"
MODULE = "model.layers.12.mlp.down_proj"


def row_edit() -> dict:
    import os

    from streamlit.testing.v1 import AppTest

    os.environ["SPECTRA_APP_MODEL"] = "demo"
    script = Path(tempfile.gettempdir()) / "spectra_bench_plan_page.py"
    script.write_text("from app.views import plan_page\nplan_page.render()\n")
    at = AppTest.from_file(str(script), default_timeout=300).run()
    at.selectbox(key="plan_module").set_value(MODULE).run()
    at.selectbox(key=f"pm_method::{MODULE}::[]").set_value("lowrank").run()
    reruns, errors = [], []
    for rank in (40, 41, 42, 43, 44, 45, 46, 47, 48, 49):  # ten fresh ranks: no cache hits
        box = next(n for n in at.number_input if n.label == "rank")
        box.set_value(rank)
        t0 = time.perf_counter()
        at.run()
        reruns.append(time.perf_counter() - t0)
        assert not at.exception, at.exception
        errors.append(next(m.value for m in at.metric if m.label == "Relative error"))
    assert len(set(errors)) == len(errors), errors  # every rank showed its own error

    from compressors.registry import make_config
    from spectra.analysis import analyze
    from spectra.preview import module_error

    df = analyze(open_model("demo"))
    sigma = df.filter(df["name"] == MODULE)["sigma"].to_list()[0]
    lookups = []
    for rank in range(50, 60):
        t0 = time.perf_counter()
        module_error(None, make_config("lowrank", rank=rank), sigma)
        lookups.append(time.perf_counter() - t0)
    return dict(
        page_rerun_median_s=statistics.median(reruns),
        page_rerun_max_s=max(reruns),
        error_lookup_median_s=statistics.median(lookups),
        target_s=0.1,
    )


def previews() -> dict:
    from compressors.registry import make_config
    from spectra.preview import Previewer

    model, tok = open_model("demo", "cpu", "float32", "none").load(), open_model("demo").tokenizer()
    pv = Previewer(model, tok)
    layers = {MODULE: make_config("lowrank", rank=64)}
    t0 = time.perf_counter()
    first = pv.preview(layers, 2048)
    first_s = time.perf_counter() - t0
    rows = []
    for block in (0, 10, 20, 29):
        layers = dict(layers)
        layers[f"model.layers.{block}.self_attn.o_proj"] = make_config("lowrank", rank=100)
        r = pv.preview(layers, 2048)
        rows.append(dict(block=block, seconds=r.seconds, first_block=r.first_block, ppl=r.ppl))
    return dict(
        tokens=first.tokens,
        first_preview_s=first_s,
        dense_ppl=first.dense_ppl,
        one_module_changed=rows,
        median_s=statistics.median(r["seconds"] for r in rows),
        max_s=max(r["seconds"] for r in rows),
        target_s=5.0,
    )


def default_path() -> dict:
    """Auto-allocate with the Plan page's defaults, then the first preview (library calls
    the page makes, timed phase by phase)."""
    from spectra.data.calibration import calibrate, for_model
    from spectra.plan import sensitivity as sens
    from spectra.plan.auto import auto_plan
    from spectra.plan.defaults import DEFAULT_METHOD, DEFAULT_TARGET_PARAMS, FIRST_CALIB_TOKENS
    from spectra.preview import Previewer

    model, tok = open_model("demo", "cpu", "float32", "none").load(), open_model("demo").tokenizer()
    t0 = time.perf_counter()
    calib = for_model("demo", tokens=FIRST_CALIB_TOKENS)
    info: dict = {}
    grams = calibrate(open_model("demo"), calib, network=model, info=info)
    calib_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    settings = sens.SensitivitySettings("calib", calib.corpus, calib.tokens, calib.seqlen)
    result = auto_plan(
        open_model("demo"),
        DEFAULT_METHOD,
        target_params=DEFAULT_TARGET_PARAMS,
        sensitivity="calib",
        sens_settings=settings,
    )
    allocate_s = time.perf_counter() - t0
    layers = dict(result.plan.layers)  # module -> config, as the page hands them over
    pv = Previewer(model, tok, grams=grams)
    t0 = time.perf_counter()
    built = pv.prebuild(layers)
    prebuild_s = time.perf_counter() - t0
    first = pv.preview(layers, 2048)
    return dict(
        calibration_tokens=calib.tokens,
        calibration_cached=bool(info.get("cached")),
        calibration_s=calib_s,
        allocate_s=allocate_s,
        prebuild_s=prebuild_s,
        prebuilt_modules=built,
        auto_allocate_s=calib_s + allocate_s + prebuild_s,
        first_preview_s=first.seconds,
        first_preview_recompressed=first.recompressed,
        ppl=first.ppl,
        dense_ppl=first.dense_ppl,
        ratio=first.ppl / first.dense_ppl,
        target_first_preview_s=30.0,
        target_ratio=2.0,
    )


SECTIONS = {"row_edit": row_edit, "preview": previews, "default_path": default_path}


def main() -> None:
    import argparse

    import torch

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="+", choices=SECTIONS, help="sections to run (default: all)")
    args = ap.parse_args()
    results = json.loads(OUT.read_text()) if OUT.is_file() else {}
    results["torch_threads"] = torch.get_num_threads()
    for name, fn in SECTIONS.items():
        if not args.only or name in args.only:
            results[name] = fn()
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
