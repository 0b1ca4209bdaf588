"""`spectra export`: a `spectra apply` output in a format other engines load."""

from __future__ import annotations

import json
import sys
from collections import Counter


def cmd_export(args) -> int:
    from compressors.opened import open_out  # deferred: torch
    from spectra.export import SERVE, export

    out = open_out(args.checkpoint, "cpu", "auto", args.offload)
    summary = export(
        out, args.format, args.out, args.gguf_type, args.dtype, args.force,
        args.gguf_embedding_type,
    )  # fmt: skip
    summary["serve"] = SERVE[args.format].format(dir=args.out)
    compact = set(summary.get("bytes_by_kind", {})) - {"dense"}
    if compact:  # its own modeling file: transformers loads it; vLLM 0.32 cannot
        summary["serve"] = (
            f"AutoModelForCausalLM.from_pretrained('{args.out}', trust_remote_code=True) "
            "in transformers (vLLM's Transformers backend puts its own one-weight Linear "
            "in every projection; for vLLM, `spectra apply --dense` then export)"
        )
    if args.json:
        print(json.dumps(summary))
        return 0
    kinds = Counter((r["stored"], r["reason"]) for r in summary["modules"])
    what = args.format
    if args.format == "gguf":
        what += f" ({args.gguf_type}" + (
            f", embeddings {args.gguf_embedding_type})" if args.gguf_embedding_type else ")"
        )
    print(
        f"{args.out}: {what}, {summary['bytes'] / 1e6:.1f} MB in {len(summary['files'])} files, "
        f"{summary['seconds']:.1f} s"
    )
    for (stored, reason), n in sorted(kinds.items(), key=lambda kv: -kv[1]):
        print(f"  {n:4d} modules {stored}" + (f": {reason}" if reason else ""))
    if summary.get("bytes_by_kind"):
        print("  bytes by form: " + ", ".join(
            f"{k} {_size(v)}" for k, v in summary["bytes_by_kind"].items()))  # fmt: skip
    print(f"serve it: {summary['serve']}")
    return 0


def _size(b: int) -> str:
    if b >= 1e9:
        return f"{b / 1e9:.2f} GB"
    return f"{b / 1e6:.1f} MB" if b >= 1e6 else f"{b / 1e3:.1f} kB"


def cmd_serve_check(args) -> int:
    from spectra.export.check import serve_check

    rows = serve_check(
        args.export,
        args.baseline,
        args.engine,
        args.corpus,
        args.seqlen,
        args.max_tokens,
        args.decode,
        args.dtype,
        args.repeats,
    )
    failed = [r for r in rows if r.get("error") or not r.get("decoded")]
    if args.json:
        print(json.dumps(rows))
    else:
        for r in rows:
            if r in failed:
                continue
            print(
                f"{r['export']}: {r['engine']} {r.get('version', '')}, perplexity "
                f"{r['ppl']:.4f}, {r['file_bytes'] / 1e6:.1f} MB of weights, peak RSS "
                f"{r['peak_rss_gb']:.2f} GB, prefill {r['prefill_tok_s']:.1f} tok/s, decode "
                f"{r['decode_tok_s']:.2f} tok/s"
            )
    for r in failed:
        print(f"spectra: {r['export']}: {r['engine']}: {r.get('error', 'did not finish')}",
              file=sys.stderr)  # fmt: skip
    return 1 if failed else 0


def add_export_parsers(sub, json_help: str) -> None:
    """`spectra export` and `spectra serve-check`, with their flags."""
    from pathlib import Path

    ex = sub.add_parser("export", help="write an apply output for vLLM, transformers or llama.cpp")
    ex.add_argument("checkpoint", metavar="OUT", help="a `spectra apply` (or heal) output")
    ex.add_argument(
        "--format",
        required=True,
        choices=("compressed-tensors", "gguf", "hf"),
        help="compressed-tensors (vLLM, transformers), gguf (llama.cpp) or hf (dense)",
    )
    ex.add_argument("-o", "--out", type=Path, required=True, help="the export directory")
    ex.add_argument(
        "--gguf-type",
        default="Q8_0",
        choices=("F16", "Q8_0", "Q4_0"),
        help="tensor type of a GGUF export's matrices (default Q8_0)",
    )
    ex.add_argument(
        "--gguf-embedding-type",
        choices=("F16", "Q8_0", "Q4_0"),
        help="the token embedding's and output head's type when not compressed (default: "
        "--gguf-type), as llama.cpp's --token-embedding-type",
    )
    ex.add_argument(
        "--dtype",
        default="auto",
        choices=("auto", "float32", "float16", "bfloat16"),
        help="dense tensors and scales of compressed-tensors and hf exports, and the dtype "
        "they are reconstructed in (auto: OUT's own)",
    )
    ex.add_argument(
        "--offload",
        default="auto",
        choices=("auto", "none", "disk"),
        help="none: OUT loaded whole; disk: read a tensor and written a block at a time; "
        "auto (default): disk for an OUT written block by block or too big for half the "
        "free memory",
    )
    ex.add_argument("--force", action="store_true", help="replace an existing DIR")
    ex.add_argument("--json", action="store_true", help=json_help)
    ex.set_defaults(func=cmd_export)

    sc = sub.add_parser(
        "serve-check",
        help="load an export in its engine (llama.cpp, vLLM, transformers) and measure it",
    )
    sc.add_argument("export", metavar="DIR", help="a `spectra export` directory")
    sc.add_argument(
        "--baseline",
        metavar="DIR2",
        help="a dense export of the source made the same way, run beside it",
    )
    sc.add_argument(
        "--engine",
        default="auto",
        choices=("auto", "llama.cpp", "vllm", "transformers"),
        help="auto: llama.cpp for gguf, vllm for compressed-tensors, transformers for hf",
    )
    sc.add_argument("--corpus", default="builtin", help="builtin, wikitext2 or a text file")
    sc.add_argument("--seqlen", type=int, default=512, help="tokens per window (default 512)")
    sc.add_argument("--max-tokens", type=int, default=2048, help="evaluation tokens (default 2048)")
    sc.add_argument("--decode", type=int, default=32, help="tokens decoded greedily at batch 1")
    sc.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="decode runs; the fastest is reported (default 3: one run on a busy CPU is noise)",
    )
    sc.add_argument(
        "--dtype",
        choices=("float32", "float16", "bfloat16"),
        help="vLLM and transformers: the dtype they run in (default: the export's)",
    )
    sc.add_argument("--json", action="store_true", help=json_help)
    sc.set_defaults(func=cmd_serve_check)
