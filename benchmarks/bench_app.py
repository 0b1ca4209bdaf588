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


def _page_reruns(calibrated: bool) -> list[float]:
    """Seconds of the Plan page's rerun after each of ten fresh rank edits of MODULE, in
    a cache of its own (the demo's converted weights shared): with `calibrated`, the
    app's calibration is computed first, so each row also shows its calibrated error."""
    import os

    from streamlit.testing.v1 import AppTest

    cache = Path(tempfile.mkdtemp(prefix="spectra-row-edit-"))
    (cache / "models").symlink_to(REPO / "cache" / "models")
    os.environ["SPECTRA_CACHE"], os.environ["SPECTRA_APP_MODEL"] = str(cache), "demo"
    if calibrated:
        from spectra.data.calibration import calibrate, for_model
        from spectra.plan.defaults import FIRST_CALIB_TOKENS

        demo = open_model("demo")
        calibrate(demo, for_model(demo, tokens=FIRST_CALIB_TOKENS))
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
        if calibrated:
            shown = next(m.value for m in at.metric if m.label == "Calibration-weighted error")
            assert shown != "n/a", "the calibration was not found"
    assert len(set(errors)) == len(errors), errors  # every rank showed its own error
    return reruns


def row_edit() -> dict:
    """A rank edit's page rerun, without and with a calibration (the first calibrated
    edit factorizes the module once; its curve serves the nine after it)."""
    import os

    saved = {k: os.environ.get(k) for k in ("SPECTRA_CACHE", "SPECTRA_APP_MODEL")}
    try:
        plain, calibrated = _page_reruns(False), _page_reruns(True)
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)

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
        page_rerun_median_s=statistics.median(plain),
        page_rerun_max_s=max(plain),
        page_rerun_calibrated_median_s=statistics.median(calibrated),
        page_rerun_calibrated_max_s=max(calibrated),
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
    calib = for_model(open_model("demo"), tokens=FIRST_CALIB_TOKENS)
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

# a random checkpoint small enough to check this benchmark itself in a minute
TINY = dict(hidden=256, mlp=704, heads=4, kv=2, vocab=49152, tie=False, mlp_only=False)


def _hwm_reset(pid: int) -> None:
    """Start the process's peak resident set (VmHWM) afresh (Linux: clear_refs 5)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def _status_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


class Sampler:
    """The server's resident set every second, for the curve of where memory goes."""

    def __init__(self, pid: int):
        import threading

        self.pid, self.t0, self.samples = pid, time.perf_counter(), []
        self.marks: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            try:
                rss = _status_kb(self.pid, "VmRSS")
            except (OSError, KeyError):
                return
            self.samples.append((round(time.perf_counter() - self.t0, 1), round(rss / 1e6, 3)))

    def mark(self, what: str) -> None:
        self.marks.append((round(time.perf_counter() - self.t0, 1), what))

    def stop(self) -> dict:
        self._stop.set()
        self.thread.join()
        return {"rss_gb_every_s": self.samples, "marks": self.marks}


def _phase(pid: int, fn) -> dict:
    """Wall time of `fn()` and the server's peak resident set while it ran."""
    _hwm_reset(pid)
    t0 = time.perf_counter()
    fn()
    seconds = time.perf_counter() - t0
    return {
        "seconds": round(seconds, 1),
        "peak_rss_gb": round(_status_kb(pid, "VmHWM") * 1024 / 1e9, 3),
    }


def _until(page, text: str, timeout: float) -> None:
    """Until `text` shows, failing at once on an error or exception in the page."""
    bad = page.locator('[data-testid="stException"], [data-testid="stAlertContentError"]')
    end = time.perf_counter() + timeout / 1000
    while time.perf_counter() < end:
        if page.get_by_text(text).count():
            return
        if bad.count():
            raise RuntimeError(f"the page failed before '{text}': {bad.first.inner_text()}")
        page.wait_for_timeout(1000)
    raise TimeoutError(f"'{text}' did not show in {timeout / 1000:.0f} s")


def big(
    shape_name: str, layers: int, work: Path, page_only: bool = False, port: int = 8765
) -> dict:
    """The app on a random checkpoint of real shapes (issue 43), beside the command
    line doing the same work, each with its own fresh cache:

    - Model page: `spectra app DIR --offload disk` started, Chromium opens it; seconds
      until the page shows the model (its parameters), then until every spectrum is in
      (the page says so), beside `spectra analyze DIR --no-mpo`;
    - Auto-allocate with the Plan page's defaults (a 4,096-token calibration, whitened
      low rank at 80% on the calibration-weighted loss) beside `spectra plan auto DIR`
      (the same defaults: it calibrates first);
    - the first preview (2,048 tokens: the dense baseline, then the plan's modules,
      compressed in the background since Auto-allocate, waited for) beside `spectra
      apply` of the plan auto wrote and `spectra eval OUT --max-tokens 2048`.

    The server's peak resident set per action is its VmHWM, reset before the action; a
    command's is its own ru_maxrss.
    """
    import os
    import subprocess
    import sys
    import urllib.request

    sys.path.insert(0, str(REPO / "benchmarks"))
    from bench_scale import SHAPES, run, write_checkpoint
    from playwright.sync_api import sync_playwright

    shape = TINY if shape_name == "tiny" else SHAPES[shape_name]
    model = work / "model"
    config = model / "config.json"
    if config.is_file() and json.loads(config.read_text()).get("num_hidden_layers") == layers:
        gb = sum(p.stat().st_size for p in model.glob("*.safetensors")) / 1e9  # a rerun
    else:
        gb = write_checkpoint(model, shape, layers)
    out: dict = {"shape": shape_name, "layers": layers, "checkpoint_gb": round(gb, 2)}
    env = dict(os.environ, SPECTRA_CACHE=str(work / "cache-app"))
    env.pop("DISPLAY", None)
    t_launch = time.perf_counter()
    with open(work / "server.log", "w") as log:  # the server keeps its own handle
        server = subprocess.Popen(
            [sys.executable, "-m", "spectra", "app", str(model), "--offload", "disk",
             "--port", str(port)],
            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    sampler = Sampler(server.pid)
    try:
        for _ in range(240):
            try:
                with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2):
                    break
            except OSError:
                time.sleep(0.5)
        out["server_start_s"] = round(time.perf_counter() - t_launch, 1)
        with sync_playwright() as p:
            browser = p.chromium.launch(
                executable_path="/usr/bin/chromium",
                args=["--headless", "--no-sandbox", "--disable-gpu"],
            )
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            hour = 3_600_000
            _hwm_reset(server.pid)
            t0 = time.perf_counter()
            page.goto(url)
            _until(page, "Parameters in them", 120_000)
            out["app_model_page_s"] = round(time.perf_counter() - t0, 1)
            sampler.mark("model page")
            if page_only:  # the Model page only (a whole 8B model's spectra take hours)
                out["app_spectra_running"] = page.get_by_text("Spectra:").count() > 0
                browser.close()
                return out
            _until(page, "distinct matrices computed in", 3 * hour)
            out["app_all_spectra_s"] = round(time.perf_counter() - t0, 1)
            line = page.get_by_text("distinct matrices computed in").inner_text()
            out["app_spectra_line"] = line
            out["app_analysis_peak_rss_gb"] = round(_status_kb(server.pid, "VmHWM") * 1024 / 1e9, 3)
            sampler.mark("spectra in")
            page.goto(f"{url}/plan")
            _until(page, "Selected module", 600_000)

            def allocate():
                page.get_by_role("button", name="Auto-allocate").click()
                _until(page, "Auto-allocated lowrank", 4 * hour)

            sampler.mark("auto-allocate")
            out["app_auto_allocate"] = _phase(server.pid, allocate)
            out["app_auto_message"] = page.get_by_text("Auto-allocated lowrank").inner_text()
            sampler.mark("preview")

            def preview():
                page.get_by_role("button", name="Preview perplexity").click()
                _until(page, "Compressed perplexity", 4 * hour)

            out["app_first_preview"] = _phase(server.pid, preview)
            sampler.mark("done")
            browser.close()
    finally:
        out["server_rss"] = sampler.stop()
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:  # a spectra thread mid-matrix: not worth waiting
            server.kill()
            server.wait()
    spectra = [sys.executable, "-m", "spectra"]
    cli_env = dict(os.environ, SPECTRA_CACHE=str(work / "cache-cli"))
    day = 6 * 3600
    plan = work / "plan.yaml"
    for name, cmd in (
        ("cli_analyze", [*spectra, "analyze", str(model), "--no-mpo", "--json"]),
        ("cli_plan_auto", [*spectra, "plan", "auto", str(model), "--offload", "disk",
                           "-o", str(plan), "--json"]),
        ("cli_apply", [*spectra, "apply", str(plan), "--model", str(model), "--offload",
                       "disk", "-o", str(work / "out"), "--force", "--json"]),
        ("cli_eval", [*spectra, "eval", str(work / "out"), "--max-tokens", "2048",
                      "--json"]),
    ):  # fmt: skip
        got = run(cmd, cli_env, day, work)
        got.pop("stdout", None)
        out[name] = got
        print(name, got, flush=True)
    a, c = out["app_auto_allocate"], out["cli_plan_auto"]
    out["auto_allocate_time_ratio"] = round(a["seconds"] / c["seconds"], 3)
    out["auto_allocate_rss_over_cli_gb"] = round(a["peak_rss_gb"] - c["peak_rss_gb"], 3)
    spectra_s = float(out["app_spectra_line"].split("computed in ")[1].split(" s")[0])
    out["analysis_time_ratio"] = round(spectra_s / out["cli_analyze"]["seconds"], 3)
    p, e = out["app_first_preview"], out["cli_eval"]
    out["preview_rss_over_cli_eval_gb"] = round(p["peak_rss_gb"] - e["peak_rss_gb"], 3)
    return out


def main() -> None:
    import argparse

    import torch

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="+", choices=SECTIONS, help="sections to run (default: all)")
    ap.add_argument("--shape", choices=["8b", "1b", "tiny"], help="the app on a random checkpoint")
    ap.add_argument("--layers", type=int, default=4, help="its blocks (default 4)")
    ap.add_argument("--work", type=Path, help="where it goes (default: a temporary folder)")
    ap.add_argument("--page-only", action="store_true", help="time the Model page only")
    ap.add_argument("--port", type=int, default=8765, help="the server's port (default 8765)")
    args = ap.parse_args()
    results = json.loads(OUT.read_text()) if OUT.is_file() else {}
    results["torch_threads"] = torch.get_num_threads()
    if args.shape:
        import shutil

        work = args.work or Path(tempfile.mkdtemp(prefix="spectra-bench-app-"))
        try:
            got = big(args.shape, args.layers, work, args.page_only, args.port)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        key = f"{args.shape}/{args.layers}" + ("/page" if args.page_only else "")
        results.setdefault("big", {})[key] = got
        OUT.write_text(json.dumps(results, indent=2) + "\n")
        print(json.dumps(got, indent=2))
        return
    for name, fn in SECTIONS.items():
        if not args.only or name in args.only:
            results[name] = fn()
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
