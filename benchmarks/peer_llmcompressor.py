"""The peer of bench_peers.py: llm-compressor's oneshot on given calibration windows.

    .venv-peers/bin/python benchmarks/peer_llmcompressor.py --model DIR --windows W \
        --recipe gptq|wanda|sparsegpt [--bits B --group-size G] [--sparsity S] --out FILE

Runs in the `peers` environment (llmcompressor pins its own transformers), never
imports spectra, reads the calibration windows bench_peers.py wrote (token ids,
safetensors) and writes every linear weight of the result as llm-compressor leaves
it (GPTQ: the dequantized codes; pruning: the pruned weights) to FILE
(safetensors), plus FILE.json with the oneshot wall time and the settings.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def recipe(args):
    if args.recipe == "gptq":
        from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
        from llmcompressor.modifiers.quantization import GPTQModifier

        weights = QuantizationArgs(
            num_bits=args.bits,
            type="int",
            symmetric=True,
            strategy="group",
            group_size=args.group_size,
            actorder="static",
        )
        scheme = QuantizationScheme(targets=["Linear"], weights=weights)
        return GPTQModifier(
            config_groups={"group_0": scheme},
            ignore=["lm_head"],
            block_size=128,
            dampening_frac=0.01,
        )
    if args.recipe == "wanda":
        from llmcompressor.modifiers.pruning import WandaPruningModifier

        return WandaPruningModifier(sparsity=args.sparsity, mask_structure="0:0")
    from llmcompressor.modifiers.pruning import SparseGPTModifier

    return SparseGPTModifier(
        sparsity=args.sparsity, mask_structure="0:0", block_size=128, dampening_frac=0.01
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--windows", required=True)
    p.add_argument("--recipe", choices=("gptq", "wanda", "sparsegpt"), required=True)
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()

    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(torch.get_num_threads())
    ids = load_file(args.windows)["input_ids"]
    data = Dataset.from_dict(
        {"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()}
    )
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    t0 = time.perf_counter()
    oneshot(
        model=model,
        dataset=data,
        recipe=recipe(args),
        num_calibration_samples=ids.shape[0],
        max_seq_length=ids.shape[1],
        shuffle_calibration_samples=False,
    )
    seconds = time.perf_counter() - t0
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and name != "lm_head":
            out[name] = mod.weight.detach().float().contiguous().cpu()
    save_file(out, str(args.out))
    meta = dict(vars(args), out=str(args.out), seconds=seconds, modules=len(out))
    Path(f"{args.out}.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"{args.recipe}: oneshot {seconds:.1f} s, {len(out)} modules", flush=True)


if __name__ == "__main__":
    main()
