"""The `spectra` command line.

Exit codes: 0 success, 2 bad input (one line on stderr, no traceback), 1 internal error.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from spectra.errors import SpectraInputError
from spectra.roles import ROLES

OUT_FORMATS = (".parquet", ".csv", ".json")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, like every other bad input
        raise SpectraInputError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="spectra", description="Weight spectra of transformer language models.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    a = sub.add_parser("analyze", help="spectra, metrics and MPO bond profiles of every matrix")
    a.add_argument("model", help="demo, a model directory, a .safetensors/.gguf file or a hub id")
    a.add_argument("--device", default="auto", help="auto (cuda when present), cpu or cuda")
    a.add_argument("--cores", type=int, default=3, help="MPO cores K for bond profiles (2..6)")
    a.add_argument(
        "--no-mpo",
        action="store_true",
        help="skip the MPO bond profiles (spectra and metrics only)",
    )
    a.add_argument("--out", type=Path, help="write the full table (.parquet, .csv or .json)")
    a.add_argument("--json", action="store_true", help="print machine-readable results on stdout")
    a.add_argument("--no-cache", action="store_true", help="neither read nor write the cache")
    a.set_defaults(func=cmd_analyze)

    plan = sub.add_parser("plan", help="compression plans")
    plan_sub = plan.add_subparsers(dest="plan_command", required=True, parser_class=_Parser)
    show = plan_sub.add_parser("show", help="the plan resolved against a model, module by module")
    show.add_argument("plan", type=Path)
    show.add_argument("--model", required=True)
    show.add_argument("--json", action="store_true", help="print the resolved table as JSON")
    show.set_defaults(func=cmd_plan_show)

    ap = sub.add_parser("apply", help="compress a model with a plan into OUT")
    ap.add_argument("plan", type=Path)
    ap.add_argument("--model", required=True)
    ap.add_argument("-o", "--out", type=Path, required=True)
    ap.add_argument("--dense", action="store_true", help="also write OUT/dense, a plain checkpoint")
    ap.add_argument("--force", action="store_true", help="replace an existing OUT")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--json", action="store_true")
    ap.set_defaults(func=cmd_apply)

    ev = sub.add_parser("eval", help="perplexity on a corpus (GPTQ / SVD-LLM convention)")
    ev.add_argument("model")
    ev.add_argument("--corpus", default="builtin", help="builtin, wikitext2 or a text file")
    ev.add_argument("--seqlen", type=int, default=512)
    ev.add_argument("--max-tokens", type=int, help="score only the first N tokens")
    ev.add_argument("--device", default="auto")
    ev.add_argument("--json", action="store_true")
    ev.add_argument(
        "--no-baseline",
        action="store_true",
        help="for a compressed OUT: skip the dense model's perplexity",
    )
    ev.set_defaults(func=cmd_eval)

    app = sub.add_parser("app", help="open the Streamlit app")
    app.add_argument("model", nargs="?", default="demo")
    app.add_argument("--port", type=int, default=8501)
    app.set_defaults(func=cmd_app)
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return args.func(args) or 0
    except SpectraInputError as e:
        print(f"spectra: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("spectra: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # internal error: one line unless SPECTRA_DEBUG is set
        if os.environ.get("SPECTRA_DEBUG"):
            raise
        print(f"spectra: internal error: {e.__class__.__name__}: {e}", file=sys.stderr)
        return 1


def check_out_path(out: Path, formats=OUT_FORMATS) -> None:
    """Fail early, before any work, if `out` has a bad suffix or cannot be written."""
    if out.suffix.lower() not in formats:
        raise SpectraInputError(f"--out {out}: unsupported format (use {', '.join(formats)})")
    if out.is_dir():
        raise SpectraInputError(f"--out {out}: is a directory")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise SpectraInputError(f"--out {out}: directory {parent} does not exist")
    import tempfile

    try:  # a real probe: os.access says yes to root even on read-only mounts
        with tempfile.NamedTemporaryFile(dir=parent, prefix=".spectra-probe-"):
            pass
    except OSError as e:
        raise SpectraInputError(f"--out {out}: not writable ({e.strerror})") from e


def cmd_analyze(args) -> int:
    from spectra import mpo

    mpo.check_cores(args.cores)
    if args.out is not None:
        check_out_path(args.out)
    from spectra.analyze import analyze
    from spectra.report import format_table, summaries

    info: dict = {}
    t0 = time.perf_counter()
    with _progress_bar("analyzing") as progress:
        df = analyze(
            args.model,
            device=args.device,
            cores=args.cores,
            with_mpo=not args.no_mpo,
            use_cache=not args.no_cache,
            progress=progress,
            info=info,
        )
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

    from spectra.cache import atomic_path

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


class _progress_bar:
    """tqdm on an interactive terminal, silent otherwise; yields a progress callback."""

    def __init__(self, desc: str):
        self.desc, self.bar = desc, None

    def __enter__(self):
        if not sys.stderr.isatty():
            return None
        from tqdm import tqdm

        def update(done, total, name):
            if self.bar is None:
                self.bar = tqdm(total=total, desc=self.desc, unit="matrix", file=sys.stderr)
            self.bar.update(done - self.bar.n)
            self.bar.set_postfix_str(name[-40:], refresh=False)

        return update

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.close()
        return False


def cmd_plan_show(args) -> int:
    from spectra import models
    from spectra import plan as plans

    plan = plans.load(args.plan)
    mats = models.matrices(args.model)
    entries = plans.resolve(plan, mats, rank_of=_energy_ranks(args.model))
    order = {r: i for i, r in enumerate(ROLES)}
    entries.sort(key=lambda e: (-1 if e.block is None else e.block, order.get(e.role, 99)))
    rows = [
        dict(
            module=e.name,
            rule=e.source or "-",
            method=_settings(e.config),
            shape=f"{e.shape[0]}x{e.shape[1]}",
            params_before=e.params_before,
            params_after=e.params_after,
            bits_before=e.bits_before,
            bits_after=e.bits_after,
        )
        for e in entries
    ]
    linear = [e for e in entries if e.role not in plans.NOT_TARGETABLE]
    done = [e for e in linear if e.config is not None]
    totals = dict(
        modules=len(linear),
        compressed=len(done),
        params_before=sum(e.params_before for e in linear),
        params_after=sum(e.params_after for e in linear),
        bits_before=sum(e.bits_before for e in linear),
        bits_after=sum(e.bits_after for e in linear),
    )
    totals["params_ratio"] = totals["params_after"] / totals["params_before"]
    totals["bits_per_param"] = totals["bits_after"] / totals["params_before"]
    totals["size_mb_after"] = totals["bits_after"] / 8 / 2**20
    if args.json:
        print(
            json.dumps(
                {"plan": str(args.plan), "model": args.model, "modules": rows, "totals": totals}
            )
        )
        return 0
    import polars as pl

    from spectra.report import format_table

    print(format_table(pl.DataFrame(rows)))
    print(
        f"\n{totals['compressed']} of {totals['modules']} linear modules compressed; "
        f"parameters {totals['params_before'] / 1e6:.2f}M -> {totals['params_after'] / 1e6:.2f}M "
        f"({totals['params_ratio']:.1%}); {totals['bits_per_param']:.2f} bits per parameter "
        f"({totals['size_mb_after']:.1f} MB)"
    )
    return 0


def _settings(config) -> str:
    """`method(knob=value, ...)` with the knobs that differ from the method's defaults."""
    if config is None:
        return "dense"
    import dataclasses

    knobs = [
        f"{f.name}={getattr(config, f.name)}"
        for f in dataclasses.fields(config)
        if getattr(config, f.name) != f.default
    ]
    return f"{config.method}({', '.join(knobs)})"


def _energy_ranks(model: str):
    """rank_of(name, energy) from the model's cached spectra, computed on first need."""
    cache: dict = {}

    def rank_of(name: str, energy: float) -> int:
        if "df" not in cache:
            from spectra.analyze import analyze

            cache["df"] = {
                r["name"]: r["sigma"]
                for r in analyze(model, with_mpo=False).select("name", "sigma").to_dicts()
            }
        from spectra.metrics import energy_rank

        return energy_rank(cache["df"][name], energy)

    return rank_of


def cmd_apply(args) -> int:
    from spectra import models
    from spectra import plan as plans

    plan = plans.load(args.plan)
    out = args.out
    if out.exists() and not args.force:
        raise SpectraInputError(f"{out}: already exists (pass --force to replace it)")
    if not out.parent.is_dir():
        raise SpectraInputError(f"{out}: directory {out.parent} does not exist")
    # the plan must fit the model before anything heavy is loaded
    plans.resolve(plan, models.matrices(args.model), rank_of=_energy_ranks(args.model))
    from compressors import apply as applying
    from compressors import io

    t0 = time.perf_counter()
    model = models.load(args.model, device=args.device)
    entries = plans.resolve(
        plan,
        [t for t, _ in applying.linear_targets(model).values()],
        rank_of=_energy_ranks(args.model),
    )
    needs_data = any(e.config is not None and applying.needs_data(e.config) for e in entries)
    try:
        tokenizer = models.load_tokenizer(args.model)
    except SpectraInputError:
        if needs_data:
            raise
        tokenizer = None  # a data-free plan needs none; OUT then has no tokenizer either
    calib = calibration_windows(tokenizer, plan.calibration) if needs_data else None
    with _progress_bar("compressing") as progress:
        compressed, reports, facts = applying.apply(model, plan, calib_ids=calib, progress=progress)
    seconds = time.perf_counter() - t0
    rows = [applying.asdict(r) for r in reports]
    before = sum(e.params_before for e in entries if e.role not in plans.NOT_TARGETABLE)
    totals = dict(
        modules=len(rows),
        params_before=before,
        params_after=before - sum(r["params_before"] - r["params_after"] for r in rows),
        bits_before=16 * before,
        bits_after=16 * before - sum(r["bits_before"] - r["bits_after"] for r in rows),
        seconds=seconds,
    )
    totals["bits_per_param"] = totals["bits_after"] / before
    report = dict(
        model=args.model,
        plan=str(args.plan),
        calibration=vars(plan.calibration),
        calibration_tokens=0 if calib is None else int(calib.numel()),
        totals=totals,
        modules=rows,
    )
    io.save(
        out, compressed, facts, args.plan.read_text(), report, tokenizer, args.dense, args.force
    )
    if args.json:
        print(json.dumps({"out": str(out), **totals}))
    else:
        print(
            f"{out}: {totals['modules']} modules compressed in {seconds:.1f} s; linear "
            f"parameters {before / 1e6:.2f}M -> {totals['params_after'] / 1e6:.2f}M, "
            f"{totals['bits_per_param']:.2f} bits per parameter; report: {out / 'report.json'}"
        )
    return 0


def calibration_windows(tokenizer, spec):
    """`samples` windows of `seqlen` calibration tokens, chosen with `seed`."""
    import torch

    from spectra import eval as ev

    ids = ev.windows(ev.token_stream(tokenizer, spec.corpus, "calib"), spec.seqlen)
    pick = torch.randperm(ids.shape[0], generator=torch.Generator().manual_seed(spec.seed))
    return ids[pick[: spec.samples]]


def cmd_eval(args) -> int:
    from compressors import io
    from spectra import eval as ev
    from spectra import models

    if args.seqlen < 2:
        raise SpectraInputError(f"--seqlen {args.seqlen}: must be at least 2")
    if args.max_tokens is not None and args.max_tokens < args.seqlen:
        raise SpectraInputError(
            f"--max-tokens {args.max_tokens}: less than one window (--seqlen {args.seqlen})"
        )
    compressed = io.is_compressed_checkpoint(args.model)
    device = models.resolve_device(args.device)
    if compressed:  # a corrupt OUT fails here, on the checkpoint itself
        model = io.load(args.model, device)[0]
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(args.model)
        except (OSError, ValueError) as e:
            raise SpectraInputError(f"{args.model}: no usable tokenizer in the checkpoint") from e
        ids = ev.token_stream(tokenizer, args.corpus, "eval")
    else:
        tokenizer = models.load_tokenizer(args.model)
        ids = ev.token_stream(tokenizer, args.corpus, "eval")  # bad corpora fail before loading
        model = models.load(args.model, device)
    result = {"model": args.model, **_ppl(model, tokenizer, ids, args).to_dict()}
    if compressed and not args.no_baseline:
        source = json.loads((Path(args.model) / "report.json").read_text()).get("model")
        base = _ppl(models.load(source, device), tokenizer, ids, args)
        result["baseline"] = {"model": source, **base.to_dict()}
    if args.json:
        print(json.dumps(result))
        return 0
    print(
        f"{args.model}: perplexity {result['ppl']:.3f} on {result['corpus']} "
        f"({result['split']}), {result['tokens']} tokens in {result['windows']} windows of "
        f"{result['seqlen']}, {result['dtype']}, {result['seconds']:.1f} s"
    )
    if "baseline" in result:
        b = result["baseline"]
        print(f"{b['model']} (dense baseline, same tokens): perplexity {b['ppl']:.3f}")
    return 0


def _ppl(model, tokenizer, ids, args):
    from spectra import eval as ev

    with _progress_bar("evaluating") as progress:
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


def cmd_app(args) -> int:
    import importlib.util
    import subprocess

    found = importlib.util.find_spec("app")  # located, not imported: spectra stays headless
    if found is None or not found.submodule_search_locations:
        raise SpectraInputError("the app package is not installed")
    main_py = Path(next(iter(found.submodule_search_locations))) / "main.py"
    env = dict(os.environ, SPECTRA_APP_MODEL=args.model)
    cmd = [
        sys.executable,
        "-m",
        "streamlit",
        "run",
        str(main_py),
        "--server.port",
        str(args.port),
        "--browser.gatherUsageStats",
        "false",
    ]
    if not os.environ.get("DISPLAY"):
        cmd += ["--server.headless", "true"]  # no browser to open on a server
    return subprocess.call(cmd, env=env)


if __name__ == "__main__":
    sys.exit(main())
