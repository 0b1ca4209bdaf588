"""`spectra eval`: perplexity of a model, an apply output (beside its dense baseline)
or a GGUF export."""

from __future__ import annotations

import json

from spectra.cli.progress import progress_bar
from spectra.data import perplexity as ev
from spectra.errors import SpectraInputError


def cmd_eval(args) -> int:
    if args.seqlen < 2:
        raise SpectraInputError(f"--seqlen {args.seqlen}: must be at least 2")
    if args.max_tokens is not None and args.max_tokens < args.seqlen:
        raise SpectraInputError(
            f"--max-tokens {args.max_tokens}: less than one window (--seqlen {args.seqlen})"
        )
    from spectra import open_model as open_any
    from spectra.export import loadable

    gguf_export = loadable(args.model)  # a `spectra export --format gguf` DIR: its file
    if gguf_export is not None:
        args.model = str(gguf_export)
    model = open_any(args.model, args.device, args.dtype, args.offload)
    tokenizer = model.tokenizer()
    ids = ev.token_stream(tokenizer, args.corpus, "eval")  # bad corpora fail before loading
    run = model.describe()  # how the model is held: dtype, offload, expected memory
    result = {"model": args.model, **_ppl(model.load(), tokenizer, ids, args).to_dict(), **run}
    if model.kind == "compressed" and not args.no_baseline:
        base = model.baseline(offload=args.offload)
        dense = _ppl(base.load(), tokenizer, ids, args)
        result["baseline"] = {"model": base.spec, **dense.to_dict()}
    if args.json:
        print(json.dumps(result))
        return 0
    peak = "" if result["peak_mb"] is None else f", peak memory +{result['peak_mb']:.0f} MB"
    print(
        f"{args.model}: perplexity {result['ppl']:.3f} on {result['corpus']} "
        f"({result['split']}), {result['tokens']} tokens in {result['windows']} windows of "
        f"{result['seqlen']}{' (each BOS + text)' if result['bos'] else ''}, "
        f"{result['dtype']}{', streamed from disk' if run.get('offload') == 'disk' else ''}, "
        f"{result['seconds']:.1f} s{peak}"
    )
    if "baseline" in result:
        b = result["baseline"]
        print(f"{b['model']} (dense baseline, same tokens): perplexity {b['ppl']:.3f}")
    return 0


def _ppl(model, tokenizer, ids, args):
    with progress_bar("evaluating") as progress:
        cb = (lambda done, total: progress(done, total, "")) if progress else None
        return ev.perplexity(
            model,
            tokenizer,
            corpus=args.corpus,
            seqlen=args.seqlen,
            max_tokens=args.max_tokens,
            ids=ids,
            progress=cb,
        )
