"""Peak memory of perplexity evaluation on a 262k-vocabulary model, old way and new.

    python benchmarks/bench_eval_memory.py [--layers 18] [--windows 4] [--seqlen 512]

A random model with Gemma-3-270M's shapes (hidden 640, 18 layers, 262,144-token
vocabulary, tied head; float32, about 1.07 GB) scores the same windows of random
tokens two ways, each in a fresh process: "full logits" is how `spectra eval` worked
before (the whole batch's (B, T, vocab) logits, widened to float32, then one
cross-entropy), "chunked" is `spectra.data.perplexity.window_nll` (the head applied to 64
positions at a time). Both report the peak resident memory above the model (its pages
touched first), the time and the mean NLL, which must agree. Target: chunked under
1.5 GB at seqlen 512. Results: benchmarks/results/bench_eval_memory.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "benchmarks" / "results" / "bench_eval_memory.json"


def build(layers: int):
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    cfg = Gemma3TextConfig(
        vocab_size=262144,
        hidden_size=640,
        intermediate_size=2048,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=256,
        final_logit_softcapping=None,
    )
    return Gemma3ForCausalLM(cfg).eval()


def full_logits_nll(model, x):
    """The previous window_nll: every position's logits at once."""
    import torch

    logits = model(x, use_cache=False).logits[:, :-1].float()
    nll = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="none"
    ).reshape(x.shape[0], -1)
    return nll.mean(dim=1).double()


def measure(way: str, layers: int, windows: int, seqlen: int) -> dict:
    import torch

    from spectra.data import memory
    from spectra.data import perplexity as ev

    model = build(layers)
    x = torch.randint(0, 262144, (windows, seqlen), generator=torch.Generator().manual_seed(0))
    memory.page_in(model.parameters())
    fn = ev.window_nll if way == "chunked" else full_logits_nll
    t0 = time.perf_counter()
    with memory.peak() as p, torch.no_grad():
        nll = fn(model, x)
    seconds = time.perf_counter() - t0
    params = sum(t.numel() for t in model.parameters())
    return dict(
        way=way,
        peak_mb_above_model=p.mb,
        seconds=seconds,
        mean_nll=float(nll.mean()),
        params=params,
        model_mb=params * 4 / 2**20,
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=18)
    p.add_argument("--windows", type=int, default=4)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.layers, args.windows, args.seqlen)))
        return
    runs = {}
    for way in ("full", "chunked"):
        cmd = [sys.executable, __file__, "--child", way, "--layers", str(args.layers)]
        cmd += ["--windows", str(args.windows), "--seqlen", str(args.seqlen)]
        done = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=REPO)
        runs[way] = json.loads(done.stdout.strip().splitlines()[-1])
        print(way, runs[way], flush=True)
    result = dict(
        date=time.strftime("%Y-%m-%d"),
        layers=args.layers,
        windows=args.windows,
        seqlen=args.seqlen,
        vocab=262144,
        runs=runs,
        nll_abs_difference=abs(runs["full"]["mean_nll"] - runs["chunked"]["mean_nll"]),
        memory_ratio=runs["full"]["peak_mb_above_model"] / runs["chunked"]["peak_mb_above_model"],
    )
    OUT.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}))


if __name__ == "__main__":
    main()
