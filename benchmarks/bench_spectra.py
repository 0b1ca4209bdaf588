"""Side-by-side speed and memory of `spectra analyze` and WeightWatcher's `analyze()`.

    python benchmarks/bench_spectra.py                 # CPU: demo model vs WeightWatcher,
                                                       # cache hit, sharded-memory check
    python benchmarks/bench_spectra.py --device cuda --synthetic llama2-7b   # GPU timing

Each measurement runs in its own child process so peak memory is its own: RSS is
sampled every 10 ms from a thread and reported as the peak increase over the RSS
just before the call (the model or library already loaded). Results are printed
and written as JSON (default benchmarks/results/bench_spectra[_cuda].json). The CPU
run alternates WeightWatcher, `spectra analyze` and `spectra analyze --no-mpo` (the
analysis WeightWatcher does) `--repeat` times and reports medians.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LLAMA2_7B = dict(hidden=4096, intermediate=11008, layers=32)
# sharded checkpoints for the memory bound: 12 and 24 layers of 1024/2816, float32
MEMORY_SHAPES = dict(hidden=1024, intermediate=2816, layers=24)


class PeakRSS:
    """Peak resident memory above the level at entry, sampled from a thread."""

    def __enter__(self):
        import psutil

        self.proc = psutil.Process()
        self.base = self.peak = self.proc.memory_info().rss
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while not self.stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.01)  # 10 ms: finer sampling competed for the GIL with the work

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)
        self.increase_mb = (self.peak - self.base) / 2**20
        self.peak_mb = self.peak / 2**20


def child_weightwatcher(model_dir: str) -> dict:
    import logging

    import torch
    import weightwatcher as ww
    from transformers import AutoModelForCausalLM

    logging.disable(logging.WARNING)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        details = ww.WeightWatcher(model=model).analyze()
        seconds = time.perf_counter() - t0
    alphas = {str(r.longname): float(r.alpha) for r in details.itertuples()}
    return dict(
        seconds=seconds,
        peak_rss_increase_mb=mem.increase_mb,
        peak_rss_mb=mem.peak_mb,
        matrices=len(details),
        alphas=alphas,
        version=ww.__version__,
    )


def child_spectra(spec: str, device: str, with_mpo: bool = True) -> dict:
    import polars  # noqa: F401  (library imports are not the analysis's memory)
    import threadpoolctl  # noqa: F401

    from spectra.analysis import analyze
    from spectra.io.model import open_model

    info: dict = {}
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        model = open_model(spec, device)
        df = analyze(model, with_mpo=with_mpo, info=info)
        cold = time.perf_counter() - t0
    t0 = time.perf_counter()
    analyze(open_model(spec, device), with_mpo=with_mpo, info=info)
    hit = time.perf_counter() - t0
    assert info["cached"], "second analysis was not served from the cache"
    largest = int((df["shape_m"] * df["shape_n"]).max())
    return dict(
        seconds=cold,
        cache_hit_seconds=hit,
        peak_rss_increase_mb=mem.increase_mb,
        peak_rss_mb=mem.peak_mb,
        matrices=df.height,
        largest_matrix_elements=largest,
        alphas=dict(zip(df["name"], df["alpha"], strict=True)),
    )


def run_child(kind: str, arg: str, env: dict, device: str = "auto") -> dict:
    cmd = [sys.executable, __file__, "--child", kind, "--child-arg", arg, "--device", device]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{kind} child failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def cli_cache_hit(spec: str, env: dict) -> float:
    """Wall time of a whole `spectra analyze` process answered from the cache."""
    t0 = time.perf_counter()
    subprocess.run(
        [str(Path(sys.executable).parent / "spectra"), "analyze", spec],
        env=env,
        check=True,
        capture_output=True,
    )
    return time.perf_counter() - t0


def fresh_cache(demo: Path | None) -> tuple[str, dict]:
    """A cold cache directory (the converted demo linked in, so conversion is not timed)."""
    root = tempfile.mkdtemp(prefix="spectra-bench-cache-")
    if demo is not None:
        (Path(root) / "models").mkdir()
        os.symlink(demo, Path(root) / "models" / "demo")
    return root, dict(os.environ, SPECTRA_CACHE=root)


def write_synthetic(
    path: Path, hidden: int, intermediate: int, layers: int, dtype: str, shards: int
) -> dict:
    """Random weights with Llama shapes, as sharded safetensors + index (7 linears a layer)."""
    import numpy as np
    from safetensors.numpy import save_file

    path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    shapes = {
        "self_attn.q_proj": (hidden, hidden),
        "self_attn.k_proj": (hidden, hidden),
        "self_attn.v_proj": (hidden, hidden),
        "self_attn.o_proj": (hidden, hidden),
        "mlp.gate_proj": (intermediate, hidden),
        "mlp.up_proj": (intermediate, hidden),
        "mlp.down_proj": (hidden, intermediate),
    }
    per_shard = -(-layers // shards)
    weight_map, total = {}, 0
    for s in range(shards):
        name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        tensors = {}
        for layer in range(s * per_shard, min(layers, (s + 1) * per_shard)):
            for mod, shape in shapes.items():
                key = f"model.layers.{layer}.{mod}.weight"
                w = rng.standard_normal(shape, dtype=np.float32) / np.sqrt(shape[1])
                tensors[key] = w.astype(dtype)
                weight_map[key] = name
                total += w.size
        save_file(tensors, path / name)
        del tensors
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    return dict(params=total, bytes_on_disk=size, matrices=len(weight_map))


def stats(xs: list[float]) -> dict:
    xs = sorted(xs)
    return dict(median=xs[len(xs) // 2], min=xs[0], max=xs[-1], samples=xs)


def bench_cpu(args) -> dict:
    from spectra.io import models

    demo = models.resolve("demo").root  # convert once, outside every timing
    runs: dict[str, list[dict]] = {"ww": [], "spectra": [], "spectra-no-mpo": []}
    hit_cli = []
    for _ in range(args.repeat):  # alternate, each in a fresh process and a cold cache
        for kind in runs:
            root, env = fresh_cache(demo)
            try:
                runs[kind].append(
                    run_child(kind, str(demo) if kind == "ww" else "demo", env, args.device)
                )
                if kind == "spectra":
                    hit_cli.append(cli_cache_hit("demo", env))
            finally:
                shutil.rmtree(root, ignore_errors=True)
    ww, sp, lean = (runs[k] for k in ("ww", "spectra", "spectra-no-mpo"))
    ww_s, sp_s, lean_s = ([r["seconds"] for r in rs] for rs in (ww, sp, lean))
    t_ww, t_sp, t_lean = stats(ww_s), stats(sp_s), stats(lean_s)
    common = sorted(set(ww[0]["alphas"]) & set(sp[0]["alphas"]))
    diffs = sorted(abs(ww[0]["alphas"][k] - sp[0]["alphas"][k]) for k in common)
    result = dict(
        model="demo (SmolLM2-135M-Instruct)",
        repeats=args.repeat,
        weightwatcher=dict(
            seconds=t_ww,
            matrices=ww[0]["matrices"],
            version=ww[0]["version"],
            peak_rss_increase_mb=max(r["peak_rss_increase_mb"] for r in ww),
        ),
        spectra=dict(
            seconds=t_sp,
            matrices=sp[0]["matrices"],
            peak_rss_increase_mb=max(r["peak_rss_increase_mb"] for r in sp),
            cache_hit_seconds=stats([r["cache_hit_seconds"] for r in sp]),
            cache_hit_cli_process_seconds=stats(hit_cli),
        ),
        spectra_no_mpo=dict(
            seconds=t_lean, peak_rss_increase_mb=max(r["peak_rss_increase_mb"] for r in lean)
        ),
        speedup=t_ww["median"] / t_sp["median"],
        speedup_same_analysis=t_ww["median"] / t_lean["median"],
        # this machine's speed drifts by up to 1.5x within minutes (the same BLAS loop
        # measured 0.22-0.32 s): ratios within one alternation round, and of the fastest
        # runs, are steadier than the ratio of medians
        speedup_per_round=stats([w / s for w, s in zip(ww_s, sp_s, strict=True)]),
        speedup_same_analysis_per_round=stats([w / s for w, s in zip(ww_s, lean_s, strict=True)]),
        speedup_fastest=t_ww["min"] / t_sp["min"],
        speedup_same_analysis_fastest=t_ww["min"] / t_lean["min"],
        alpha_agreement=dict(
            matrices_compared=len(common),
            max_abs_diff=diffs[-1],
            median_abs_diff=diffs[len(diffs) // 2],
        ),
    )
    if not args.skip_memory:
        # a 2-layer checkpoint of 64-wide matrices: what any analysis costs (interpreter
        # state, BLAS thread buffers, polars), whatever the model
        fixed = bench_memory(args, layers=2, hidden=64, intermediate=176)
        result["memory_fixed_overhead_mb"] = fixed["peak_rss_increase_mb"]
        runs = [bench_memory(args, layers) for layers in (12, 24)]
        for r in runs:
            r["peak_above_fixed_mb"] = r["peak_rss_increase_mb"] - fixed["peak_rss_increase_mb"]
        result["sharded_memory"] = runs
    return result


def bench_memory(args, layers: int, **shape) -> dict:
    shapes = dict(MEMORY_SHAPES, layers=layers, **shape)
    work = Path(tempfile.mkdtemp(prefix="spectra-bench-ckpt-"))
    try:
        meta = write_synthetic(work / "ckpt", dtype="float32", shards=min(6, layers), **shapes)
        root, env = fresh_cache(None)
        try:
            sp = run_child("spectra", str(work / "ckpt"), env, args.device)
        finally:
            shutil.rmtree(root, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    workers = min(os.cpu_count() or 1, 8)
    # per worker: the largest matrix as read (float32 here), the float64 blocks that are
    # summed into its Grams (spectra.linalg.svd.CHUNK_BYTES each, one for the spectrum, one for
    # the bond unfoldings), and its Gram with one block's product (hidden^2 each)
    from spectra.linalg.svd import CHUNK_BYTES

    per_worker = sp["largest_matrix_elements"] * 4 + 2 * CHUNK_BYTES + 2 * shapes["hidden"] ** 2 * 8
    bound_mb = workers * per_worker / 2**20
    return dict(
        checkpoint_mb=meta["bytes_on_disk"] / 2**20,
        matrices=meta["matrices"],
        shapes=shapes,
        seconds=sp["seconds"],
        peak_rss_increase_mb=sp["peak_rss_increase_mb"],
        largest_tensor_bound_mb=bound_mb,
        workers=workers,
        checkpoint_over_bound=meta["bytes_on_disk"] / 2**20 / bound_mb,
    )


def bench_cuda(args) -> dict:
    work = Path(args.workdir or tempfile.mkdtemp(prefix="spectra-bench-7b-"))
    t0 = time.perf_counter()
    shapes = dict(LLAMA2_7B, layers=args.layers or LLAMA2_7B["layers"])
    meta = write_synthetic(work / "ckpt", dtype="float16", shards=8, **shapes)
    written = time.perf_counter() - t0
    root, env = fresh_cache(None)
    try:
        sp = run_child("spectra", str(work / "ckpt"), env, args.device)
    finally:
        shutil.rmtree(root, ignore_errors=True)
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    import torch

    return dict(
        model=f"synthetic Llama-2-7B shapes ({meta['matrices']} linear matrices, float16)",
        device=args.device,
        gpu=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        seconds_end_to_end=sp["seconds"],
        write_seconds=written,
        matrices=sp["matrices"],
        cache_hit_seconds=sp["cache_hit_seconds"],
        peak_rss_increase_mb=sp["peak_rss_increase_mb"],
        checkpoint=meta,
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--synthetic", choices=["llama2-7b"], help="GPU run on a synthetic checkpoint")
    p.add_argument("--skip-memory", action="store_true", help="skip the sharded-memory check")
    p.add_argument("--repeat", type=int, default=3, help="alternating repeats (medians reported)")
    p.add_argument("--layers", type=int, help="with --synthetic: fewer layers (smoke test)")
    p.add_argument("--workdir", help="where to write the synthetic checkpoint (kept)")
    p.add_argument("--out", type=Path)
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--child-arg", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        if args.child == "ww":
            res = child_weightwatcher(args.child_arg)
        else:
            res = child_spectra(args.child_arg, args.device, args.child != "spectra-no-mpo")
        print(json.dumps(res))
        return
    res = bench_cuda(args) if args.synthetic else bench_cpu(args)
    res.update(
        machine=dict(
            cpus=os.cpu_count(), platform=platform.platform(), python=platform.python_version()
        ),
        date=time.strftime("%Y-%m-%d %H:%M:%S"),
    )
    name = "bench_spectra_cuda.json" if args.synthetic else "bench_spectra.json"
    out = args.out or REPO / "benchmarks" / "results" / name
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res, indent=2))
    print(f"written to {out}")


if __name__ == "__main__":
    main()
