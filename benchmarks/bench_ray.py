"""`spectra analyze --ray` against the local thread pool, and a projection to large models.

    python benchmarks/bench_ray.py            # writes benchmarks/results/bench_ray.json

Side by side in one run, each a fresh `spectra analyze demo --no-cache` process:
the local path; `--ray auto` starting its own local cluster (start-up and shutdown
included); `--ray auto` with RAY_ADDRESS naming a cluster started beforehand by
`ray start --head` (the usual set-up on a cluster). The three tables are compared
for equality. Then the exact spectrum and MPO profile (K=3) of random float32
matrices of Llama-3-70B's shapes scaled down by 8 and 4 are timed (one BLAS thread,
as each task runs), which calibrates the flop model the projection uses.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results" / "bench_ray.json"
SPECTRA = [sys.executable, "-m", "spectra.cli"]
RAY = Path(sys.executable).with_name("ray")
PORT = 6391
LOCAL_AUTH = {"RAY_AUTH_MODE": "disabled"}  # a throwaway cluster on 127.0.0.1 only

# (hidden, intermediate, layers, kv width, vocab): Llama-3-70B and Llama-3.1-405B
MODELS = {
    "llama-3-70b": (8192, 28672, 80, 1024, 128256),
    "llama-3.1-405b": (16384, 53248, 126, 1024, 128256),
}
# projection assumptions (stated in the README)
H100_FP64 = 67e12  # FP64 tensor-core peak, H100 SXM
GPU_EFFICIENCY = 0.25  # of peak, for the float64 Gram products
GPU_EIG_FLOPS = 1e12  # symmetric eigensolver (memory-bound tridiagonalisation), FP64
READ_GBPS_PER_NODE = 2.0  # shared storage read rate per 8-GPU node, GB/s (bf16 weights)
TASK_OVERHEAD_S = 0.05  # scheduling and result transfer per task


def timed(cmd, env=None) -> float:
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(map(str, cmd))} failed: {r.stderr.strip()[-500:]}")
    return time.perf_counter() - t0


def gram_eig_flops(a: int, b: int) -> tuple[float, float]:
    """(Gram flops, eigensolver flops) of the exact singular values of an (a, b) matrix."""
    s, big = min(a, b), max(a, b)
    return 2.0 * big * s * s, 4.0 / 3.0 * s**3


def matrix_flops(m: int, n: int, cores: int = 3) -> tuple[float, float]:
    """Spectrum plus every bond's unfolding spectrum (the work of one analysis task)."""
    from spectra.linalg import mpo

    mf, nf = mpo.factorize(m, cores), mpo.factorize(n, cores)
    gram, eig = gram_eig_flops(m, n)
    for k in range(cores - 1):
        left = math.prod(x * y for x, y in zip(mf[: k + 1], nf[: k + 1], strict=True))
        g, e = gram_eig_flops(left, m * n // left)
        gram, eig = gram + g, eig + e
    return gram, eig


def gpu_seconds(m: int, n: int) -> float:
    gram, eig = matrix_flops(m, n)
    return gram / (H100_FP64 * GPU_EFFICIENCY) + eig / GPU_EIG_FLOPS


def shapes(hidden, inter, layers, kv, vocab) -> list[tuple[int, int]]:
    block = [(hidden, hidden), (kv, hidden), (kv, hidden), (hidden, hidden)]
    block += [(inter, hidden), (inter, hidden), (hidden, inter)]
    return block * layers + [(vocab, hidden), (vocab, hidden)]  # embeddings, lm_head


def cpu_rate() -> list[dict]:
    """Seconds and flops of one task on scaled Llama-3-70B shapes, one BLAS thread."""
    import numpy as np
    from threadpoolctl import threadpool_limits

    from spectra.analysis import AnalysisSettings, matrix_row

    rows = []
    rng = np.random.default_rng(0)
    with threadpool_limits(1):
        for scale in (8, 4):
            for m, n in ((8192 // scale, 8192 // scale), (28672 // scale, 8192 // scale)):
                w = rng.standard_normal((m, n), dtype=np.float32)
                t0 = time.perf_counter()
                matrix_row(w, AnalysisSettings())
                sec = time.perf_counter() - t0
                flops = sum(matrix_flops(m, n))
                rows.append(dict(shape=[m, n], seconds=sec, gflops=flops / sec / 1e9))
                print(f"  {m} x {n}: {sec:.2f} s, {flops / sec / 1e9:.1f} GFLOP/s", flush=True)
    return rows


def projection(cpu_gflops: float) -> dict:
    out = {}
    for name, spec in MODELS.items():
        mats = shapes(*spec)
        flops = sum(sum(matrix_flops(m, n)) for m, n in mats)
        gpu = [gpu_seconds(m, n) for m, n in mats]
        gb = sum(m * n for m, n in mats) * 2 / 1e9
        rows = {"matrices": len(mats), "tflop": flops / 1e12, "bf16_gb": gb}
        rows["cpu_core_hours"] = flops / (cpu_gflops * 1e9) / 3600
        for gpus in (1, 8, 64):
            nodes = max(1, gpus // 8)
            compute = sum(gpu) / gpus
            read = gb / (READ_GBPS_PER_NODE * nodes)
            tasks = len(mats) * TASK_OVERHEAD_S / gpus
            largest = max(gpu)
            rows[f"minutes_{gpus}_gpus"] = (max(compute, read, largest) + tasks) / 60
        out[name] = rows
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args()
    import polars as pl

    results: dict = {"cpus": os.cpu_count()}
    subprocess.run([*SPECTRA, "analyze", "demo", "--no-mpo"], capture_output=True)  # convert
    with tempfile.TemporaryDirectory() as tmp:
        tables = {}
        runs = {"local": ([], {}), "ray-auto-start": (["--ray", "auto"], {"RAY_ADDRESS": ""})}
        for name, (extra, env) in runs.items():
            out = Path(tmp) / f"{name}.parquet"
            results[name] = timed(
                [*SPECTRA, "analyze", "demo", "--no-cache", "--out", out, *extra], env
            )
            tables[name] = pl.read_parquet(out)
            print(f"{name}: {results[name]:.2f} s", flush=True)
        subprocess.run(
            [RAY, "start", "--head", f"--port={PORT}", f"--num-cpus={os.cpu_count()}",
             "--include-dashboard=false", "--disable-usage-stats", "--node-ip-address=127.0.0.1"],
            capture_output=True, check=True, env={**os.environ, **LOCAL_AUTH},
        )  # fmt: skip
        try:
            out = Path(tmp) / "running.parquet"
            env = {"RAY_ADDRESS": f"127.0.0.1:{PORT}", **LOCAL_AUTH}
            cmd = [*SPECTRA, "analyze", "demo", "--no-cache", "--out", out, "--ray", "auto"]
            timed(cmd, env)  # the cluster's workers start on first use
            results["ray-running-cluster"] = timed(cmd, env)
            tables["ray-running-cluster"] = pl.read_parquet(out)
            print(f"ray-running-cluster: {results['ray-running-cluster']:.2f} s", flush=True)
        finally:
            subprocess.run([RAY, "stop", "--force"], capture_output=True)
    results["tables_equal"] = all(t.equals(tables["local"]) for t in tables.values())
    results["ratio_auto_start"] = results["ray-auto-start"] / results["local"]
    results["ratio_running_cluster"] = results["ray-running-cluster"] / results["local"]
    print("per-task CPU rate (scaled Llama-3-70B shapes):")
    results["cpu_tasks"] = cpu_rate()
    gflops = min(r["gflops"] for r in results["cpu_tasks"])
    results["assumptions"] = dict(
        h100_fp64=H100_FP64,
        gpu_efficiency=GPU_EFFICIENCY,
        gpu_eig_flops=GPU_EIG_FLOPS,
        read_gb_per_s_per_node=READ_GBPS_PER_NODE,
        task_overhead_s=TASK_OVERHEAD_S,
        cpu_gflops_per_core=gflops,
    )
    results["projection"] = projection(gflops)
    print(json.dumps(results["projection"], indent=1))
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
