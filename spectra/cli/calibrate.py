"""`spectra calibrate`: the cached Grams of every linear module's calibration inputs."""

from __future__ import annotations

import json

from spectra.cli.progress import progress_bar
from spectra.data.calibration import calibrate, for_model
from spectra.io.model import open_model


def cmd_calibrate(args) -> int:
    # opened first: a one-time GGUF conversion is timed apart (it says so)
    model = open_model(args.model, args.device, args.dtype, args.offload)
    settings = for_model(model, args.corpus, args.tokens, args.seqlen, args.seed)
    info: dict = {}
    with progress_bar("calibrating", unit="block") as progress:
        grams = calibrate(
            model,
            settings,
            use_cache=not args.no_cache,
            progress=progress,
            info=info,
            ray=args.ray,
        )
    summary = describe(grams)
    summary.update(model=args.model, cached=info["cached"], seconds=round(info["seconds"], 3))
    summary.update(model.describe())
    if args.json:
        print(json.dumps(summary))
        return 0
    how = "read from the cache" if info["cached"] else "computed"
    print(
        f"{args.model}: calibration of {summary['tokens']:,} tokens "
        f"({summary['samples']} windows of {summary['seqlen']}, corpus {summary['corpus']}), "
        f"{summary['modules']} modules in {summary['blocks']} blocks sharing "
        f"{summary['grams']} Grams ({summary['megabytes']:,.0f} MB), "
        f"{how} in {info['seconds']:.1f} s: {summary['path']}"
    )
    return 0


def describe(grams) -> dict:
    """What a calibration holds, from its metadata (no tensor is read)."""
    meta = grams.meta
    blocks = meta["blocks"].values()
    return dict(
        path=str(grams.folder),
        corpus=meta["corpus"],
        tokens=meta["tokens"],
        samples=meta["samples"],
        seqlen=meta["seqlen"],
        seed=meta["seed"],
        bos=meta["bos"],
        blocks=len(meta["blocks"]),
        modules=sum(len(b["modules"]) for b in blocks),
        grams=sum(len({owner for owner, _ in b["modules"].values()}) for b in blocks),
        megabytes=sum(b["bytes"] for b in blocks) / 1e6,
    )
