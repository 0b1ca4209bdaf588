"""Peak memory and time of every command on a random checkpoint of real shapes.

Writes a random bf16 checkpoint of Llama-3-8B shapes (hidden 4096, MLP 14336, 32 heads
/ 8 KV heads, vocab 128256; the demo's tokenizer) with `--layers` blocks, then runs
each command in its own process and records the operating system's peak resident set
of that process (wait4's ru_maxrss) and its wall time:

- `eval --max-tokens 1024`, `calibrate --tokens 2048`;
- `apply` of GPTQ W4 g128 and of whitened low rank at 50% of every block's linear
  parameters (2048 calibration tokens), each with the model streamed from disk;
- `apply` of RTN W4 g128 on every block matrix (no calibration: the streaming apply
  path alone, which is what reaches 32 blocks in minutes on a CPU);
- `export --format compressed-tensors` of the GPTQ output (of the RTN one when the run
  made no GPTQ output; the row's `source` says which).

    python benchmarks/bench_scale.py --layers 2 8 [--only eval calibrate] [--shape 1b]

`--shape 1b` is the 1.17B Llama of issue 33 (hidden 2048, MLP 8192, 16 layers by
default) with GPTQ on its MLP matrices only. The checkpoint and the cache live under
--work (deleted afterwards unless --keep). Results: benchmarks/results/bench_scale.json,
merged by (shape, layers, command) with earlier runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results" / "bench_scale.json"
SHAPES = {
    "8b": dict(hidden=4096, mlp=14336, heads=32, kv=8, vocab=128256, tie=False, mlp_only=False),
    "1b": dict(hidden=2048, mlp=8192, heads=32, kv=8, vocab=128256, tie=True, mlp_only=True),
}


def write_checkpoint(path: Path, shape: dict, layers: int) -> float:
    """A random bf16 Llama checkpoint, one safetensors shard per block; GB written."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    path.mkdir(parents=True, exist_ok=True)
    h, f, heads, kv = shape["hidden"], shape["mlp"], shape["heads"], shape["kv"]
    hd = h // heads
    cfg = LlamaConfig(
        hidden_size=h,
        intermediate_size=f,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        vocab_size=shape["vocab"],
        tie_word_embeddings=shape["tie"],
        max_position_embeddings=8192,
        rope_theta=500000.0,
        bos_token_id=1,
        eos_token_id=2,
    )
    cfg.torch_dtype = "bfloat16"
    cfg.save_pretrained(path)
    gen = torch.Generator().manual_seed(0)

    def rand(*s, scale=0.02):
        return (torch.randn(*s, generator=gen) * scale).to(torch.bfloat16)

    index, total = {}, 0
    outer = {"model.embed_tokens.weight": rand(shape["vocab"], h), "model.norm.weight": rand(h) + 1}
    if not shape["tie"]:
        outer["lm_head.weight"] = rand(shape["vocab"], h)
    parts = [("model-outer.safetensors", outer)]
    for i in range(layers):
        p = f"model.layers.{i}."
        block = {
            p + "input_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
            p + "post_attention_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
            p + "self_attn.q_proj.weight": rand(heads * hd, h),
            p + "self_attn.k_proj.weight": rand(kv * hd, h),
            p + "self_attn.v_proj.weight": rand(kv * hd, h),
            p + "self_attn.o_proj.weight": rand(h, heads * hd),
            p + "mlp.gate_proj.weight": rand(f, h),
            p + "mlp.up_proj.weight": rand(f, h),
            p + "mlp.down_proj.weight": rand(h, f),
        }
        parts.append((f"model-{i:05d}.safetensors", block))
    for name, tensors in parts:
        save_file(tensors, path / name, metadata={"format": "pt"})
        total += sum(t.numel() * 2 for t in tensors.values())
        index.update({k: name for k in tensors})
        del tensors
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": index})
    )
    demo = REPO / "cache" / "models" / "demo"
    for f in demo.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, path / f.name)
    return total / 1e9


def plans(work: Path, shape: dict) -> dict[str, Path]:
    """GPTQ W4 g128 and whitened low rank at 50% of each block matrix's parameters."""
    h, f = shape["hidden"], shape["mlp"]
    kvd = shape["kv"] * (h // shape["heads"])
    calib = "calibration: {corpus: builtin, samples: 4, seqlen: 512, seed: 0}\n"
    targets = r"re:model\.layers\.\d+\.mlp\..*" if shape["mlp_only"] else r"re:model\.layers\..*"
    gptq = work / "gptq.yaml"
    gptq.write_text(
        f"version: 1\n{calib}rules:\n  - targets: ['{targets}']\n"
        "    method: quant\n    bits: 4\n    group_size: 128\n    gptq: true\n"
    )

    def half(m, n):
        return m * n // (2 * (m + n))

    shapes = {
        r"self_attn\.[qo]_proj": (h, h),
        r"self_attn\.[kv]_proj": (kvd, h),
        r"mlp\.(gate|up)_proj": (f, h),
        r"mlp\.down_proj": (h, f),
    }
    rules = "".join(
        f"  - targets: ['re:model\\.layers\\.\\d+\\.{pat}']\n"
        f"    method: lowrank\n    rank: {half(*mn)}\n    whiten: true\n"
        for pat, mn in shapes.items()
    )
    lowrank = work / "lowrank.yaml"
    lowrank.write_text(f"version: 1\n{calib}rules:\n{rules}")
    rtn = work / "rtn.yaml"
    rtn.write_text(
        f"version: 1\nrules:\n  - targets: ['{targets}']\n"
        "    method: quant\n    bits: 4\n    group_size: 128\n"
    )
    return {"gptq": gptq, "lowrank": lowrank, "rtn": rtn}


WRAP = """
import json, resource, subprocess, sys
rc = subprocess.run(sys.argv[2:]).returncode
peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # KB: the one child's
open(sys.argv[1], "w").write(json.dumps({"rc": rc, "peak_kb": peak}))
"""


def run(cmd: list[str], env: dict, timeout: float, work: Path) -> dict:
    """Wall time, exit code and the command's own peak RSS: it runs as the only child
    of a small wrapper process, whose RUSAGE_CHILDREN is then that command's."""
    stat = work / "rusage.json"
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(
            [sys.executable, "-c", WRAP, str(stat), *cmd],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return {"rc": "timeout", "seconds": timeout, "peak_rss_gb": None}
    got = json.loads(stat.read_text())
    return {
        "rc": got["rc"],
        "seconds": round(time.perf_counter() - t0, 1),
        "peak_rss_gb": round(got["peak_kb"] * 1024 / 1e9, 3),
        "stdout": proc.stdout[-600:],
        "stderr": proc.stderr[-600:] if got["rc"] else "",
    }


def export_source(work: Path) -> Path:
    """The GPTQ output when this run made one, else the RTN one (apply-gptq takes
    hours at 32 blocks on a 2-core CPU; the export path is the same for both)."""
    gptq = work / "out-gptq"
    return gptq if gptq.is_dir() or not (work / "out-rtn").is_dir() else work / "out-rtn"


def commands(model: Path, work: Path, shape: dict) -> dict[str, list[str]]:
    spectra = [sys.executable, "-m", "spectra.cli"]
    p = plans(work, shape)
    return {
        "eval": [*spectra, "eval", str(model), "--max-tokens", "1024", "--json"],
        "calibrate": [*spectra, "calibrate", str(model), "--tokens", "2048", "--json"],
        "apply-gptq": [
            *spectra, "apply", str(p["gptq"]), "--model", str(model),
            "-o", str(work / "out-gptq"), "--force", "--json",
        ],
        "apply-lowrank": [
            *spectra, "apply", str(p["lowrank"]), "--model", str(model),
            "-o", str(work / "out-lowrank"), "--force", "--json",
        ],
        "apply-rtn": [
            *spectra, "apply", str(p["rtn"]), "--model", str(model),
            "-o", str(work / "out-rtn"), "--force", "--json",
        ],
        "export": [  # the source is known only once the applies have run
            *spectra, "export", "{source}", "--format", "compressed-tensors",
            "-o", str(work / "export"), "--force", "--json",
        ],
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, nargs="+", default=[2, 8])
    ap.add_argument("--shape", choices=SHAPES, default="8b")
    ap.add_argument("--only", nargs="+", help="commands to run (default: all)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/spectra-bench-scale"))
    ap.add_argument("--offload", default="disk", help="--offload of every command")
    ap.add_argument(
        "--dtype",
        default="auto",
        help="--dtype of every command (float32 on CPUs without native bf16 matmuls, "
        "which emulate bf16 about 7x slower than float32)",
    )
    ap.add_argument("--timeout", type=float, default=3600)
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint and cache")
    args = ap.parse_args()
    shape = SHAPES[args.shape]
    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {"runs": {}}
    for layers in args.layers:
        work = args.work / f"{args.shape}-{layers}"
        shutil.rmtree(work, ignore_errors=True)
        model = work / "model"
        gb = write_checkpoint(model, shape, layers)
        env = {**os.environ, "SPECTRA_CACHE": str(work / "cache"), "PYTHONPATH": str(REPO)}
        for name, cmd in commands(model, work, shape).items():
            if args.only and name not in args.only:
                continue
            if name == "export":
                cmd = [str(export_source(work)) if c == "{source}" else c for c in cmd]
            else:
                cmd = [*cmd, "--offload", args.offload, "--dtype", args.dtype]
            r = run(cmd, env, args.timeout, work)
            r.update(checkpoint_gb=round(gb, 2), layers=layers, shape=args.shape)
            r["offload"] = args.offload if name != "export" else None
            r["dtype"] = args.dtype if name != "export" else None
            if name == "export":
                r["source"] = export_source(work).name
            key = f"{args.shape}/{layers}/{name}"
            results["runs"][key] = r
            print(key, {k: r[k] for k in ("rc", "seconds", "peak_rss_gb")}, flush=True)
            if r["rc"] != 0:
                print(r["stderr"], file=sys.stderr)
            results["machine"] = {
                "cpus": os.cpu_count(),
                "platform": platform.platform(),
                "date": time.strftime("%Y-%m-%d"),
            }
            RESULTS.write_text(json.dumps(results, indent=1))
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
