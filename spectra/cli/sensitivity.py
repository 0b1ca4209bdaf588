"""`spectra sensitivity`: per-module sensitivity, and which spectral metric predicts it."""

from __future__ import annotations

import json

from spectra.cli.progress import progress_bar
from spectra.cli.report import check_out_path, format_table
from spectra.io.model import open_model

SHOWN = 15  # modules listed on the terminal (the --out file and --json hold all)


def cmd_sensitivity(args) -> int:
    # deferred: these pull in torch; `spectra --help` imports this module
    from spectra.plan import sensitivity_report

    if args.out is not None:
        check_out_path(args.out)
    model = open_model(args.model, args.device, args.dtype, args.offload)
    settings = _settings(args, model)
    info: dict = {}
    with progress_bar(f"{args.kind} sensitivity") as progress:
        table = sensitivity_report.sensitivity_table(
            model, settings, not args.no_cache, progress, info=info
        )
        ranked, metrics = None, None
        if args.correlate:
            metrics = sensitivity_report.metric_table(
                model, not args.no_cache, _calibration(model, settings), progress
            )
            ranked = sensitivity_report.correlate(table, metrics)
    if args.out is not None:
        full = table if metrics is None else table.join(metrics, on="name", how="left")
        _write(full, args.out)
    return _report(args, settings, table, ranked, info)


def _settings(args, model):
    """The sensitivity's settings; `calib` without --tokens reads the newest cached
    calibration of the model, else a small one (plan auto's default)."""
    from spectra.data import calibration
    from spectra.plan.defaults import FIRST_CALIB_TOKENS
    from spectra.plan.sensitivity import SensitivitySettings

    if args.kind == "calib" and args.tokens is None:
        found = calibration.latest(model)
        if found is not None:
            c = found.settings
            return SensitivitySettings("calib", c.corpus, c.tokens, c.seqlen)
        return SensitivitySettings("calib", tokens=FIRST_CALIB_TOKENS)
    return SensitivitySettings(args.kind, tokens=args.tokens)


def _calibration(model, settings):
    """The calibration whose activation-aware metrics join the correlation: the one the
    calib sensitivity read, else the newest cached one (None: no calib_* metrics)."""
    from spectra.data import calibration

    if settings.kind == "calib":
        return calibration.cached(model, settings.calib_spec(model))
    return calibration.latest(model)


def _write(df, out) -> None:
    from spectra.io import cache

    suffix = out.suffix.lower()
    with cache.atomic_path(out) as tmp:
        if suffix == ".parquet":
            df.write_parquet(tmp)
        elif suffix == ".csv":
            df.write_csv(tmp)
        else:
            tmp.write_text(json.dumps(df.to_dicts()))


def _report(args, settings, table, ranked, info) -> int:
    if args.json:
        out = {
            "model": args.model,
            "kind": args.kind,
            "tokens": settings.tokens,
            "probe": settings.probe,
            "cached": info.get("cached", False),
            "modules": table.to_dicts(),
        }
        if ranked is not None:
            out["correlation"] = ranked
        print(json.dumps(out))
        return 0
    top = table.sort("score", descending=True).head(SHOWN)
    print(
        f"{args.model}: {args.kind} sensitivity of {table.height} modules (loss increase, "
        f"nats/token, of each alone at the {settings.probe} probe; {settings.tokens:,} tokens"
        f"{', cached' if info.get('cached') else ''}); the {top.height} most sensitive:"
    )
    shown = top.select("name", "role", "block", score=top["score"].map_elements(_g, str))
    print(format_table(shown))
    if ranked is not None:
        import polars as pl

        roles = list(ranked[0]["by_role"]) if ranked else []
        rows = [
            {"metric": r["metric"], "rho": r["rho"], "n": r["n"], **r["by_role"]} for r in ranked
        ]
        print("\nSpearman rho with the sensitivity (ranked by |rho|; per role on the right):")
        schema = {"metric": pl.String, "rho": pl.Float64, "n": pl.Int64}
        frame = pl.DataFrame(rows, schema={**schema, **{r: pl.Float64 for r in roles}})
        print(format_table(frame, floats=3))
    if args.out is not None:
        print(f"table: {args.out}")
    return 0


def _g(v: float) -> str:
    return f"{v:.4g}"
