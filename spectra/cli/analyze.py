"""`spectra analyze`: the analysis table, its summaries, and writing it out."""

from __future__ import annotations

import json
import time
from pathlib import Path

from spectra.analysis import analyze
from spectra.cli.progress import progress_bar
from spectra.cli.report import check_out_path, format_table, summaries
from spectra.io.cache import atomic_path
from spectra.io.model import open_model
from spectra.linalg import mpo


def cmd_analyze(args) -> int:
    mpo.check_cores(args.cores)
    if args.out is not None:
        check_out_path(args.out)

    # opened first: a one-time GGUF conversion is timed apart (it says so)
    model = open_model(args.model, args.device)
    info: dict = {}
    t0 = time.perf_counter()
    with progress_bar("analyzing") as progress:
        df = analyze(
            model,
            cores=args.cores,
            with_mpo=not args.no_mpo,
            use_cache=not args.no_cache,
            progress=progress,
            info=info,
            ray=args.ray,
        )
    if args.calib:
        from spectra.data.calib_spectra import calib_table  # deferred: torch

        with progress_bar("activation-aware spectra") as progress:
            calib = calib_table(
                model,
                use_cache=not args.no_cache,
                progress=progress,
                info=info.setdefault("calib", {}),
            )
        df = df.join(calib, on="name", how="left")
    seconds = time.perf_counter() - t0
    if args.out is not None:
        write_table(df, args.out)
    by_role, by_block = summaries(df)
    params = int((df["shape_m"] * df["shape_n"]).sum())
    where = "cache" if info.get("cached") else info.get("device", "?")
    if args.json:
        scalars = df.drop([c for c, t in df.schema.items() if t.is_nested()])
        print(
            json.dumps(
                {
                    "model": args.model,
                    "matrices": df.height,
                    "params": params,
                    "seconds": round(seconds, 3),
                    "source": where,
                    "cores": args.cores,
                    "out": str(args.out) if args.out else None,
                    "by_role": by_role.to_dicts(),
                    "by_block": by_block.to_dicts(),
                    "rows": scalars.to_dicts(),
                },
                default=str,
            )
        )
        return 0
    print(
        f"{args.model}: {df.height} matrices, {params / 1e6:.1f}M parameters, "
        f"analysed in {seconds:.2f} s ({where})"
    )
    print("\nby role (means)\n" + format_table(by_role))
    print("\nby block (means)\n" + format_table(by_block))
    if args.out is not None:
        print(f"\nfull table: {args.out}")
    return 0


def write_table(df, out: Path) -> None:
    """Write the analysis table atomically; CSV gets list columns as JSON strings."""
    import polars as pl

    with atomic_path(out) as tmp:
        suffix = out.suffix.lower()
        if suffix == ".parquet":
            df.write_parquet(tmp)
        elif suffix == ".json":
            df.write_json(tmp)
        else:
            nested = [c for c, t in df.schema.items() if t.is_nested()]
            flat = df.with_columns(
                pl.Series(c, [json.dumps(v) for v in df[c].to_list()], dtype=pl.String)
                for c in nested
            )
            flat.write_csv(tmp)
