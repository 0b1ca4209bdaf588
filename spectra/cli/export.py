"""`spectra export`: a `spectra apply` output in a format other engines load."""

from __future__ import annotations

import json
import sys
from collections import Counter


def cmd_export(args) -> int:
    from compressors.opened import open_out  # deferred: torch
    from spectra.export import SERVE, export

    out = open_out(args.checkpoint, "cpu", "auto", args.offload)
    summary = export(out, args.format, args.out, args.gguf_type, args.dtype, args.force)
    summary["serve"] = SERVE[args.format].format(dir=args.out)
    if args.json:
        print(json.dumps(summary))
        return 0
    kinds = Counter((r["stored"], r["reason"]) for r in summary["modules"])
    what = args.format + (f" ({args.gguf_type})" if args.format == "gguf" else "")
    print(
        f"{args.out}: {what}, {summary['bytes'] / 1e6:.1f} MB in {len(summary['files'])} files, "
        f"{summary['seconds']:.1f} s"
    )
    for (stored, reason), n in sorted(kinds.items(), key=lambda kv: -kv[1]):
        print(f"  {n:4d} modules {stored}" + (f": {reason}" if reason else ""))
    print(f"serve it: {summary['serve']}")
    return 0


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
