"""`spectra plan show`, `spectra apply` and `spectra eval`: the compression commands."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import shlex
import sys
import time
from pathlib import Path

from spectra.cli.progress import progress_bar
from spectra.cli.report import check_out_path, format_table
from spectra.data import calibration
from spectra.data import perplexity as ev
from spectra.errors import SpectraInputError
from spectra.io import cache
from spectra.io.model import open_model
from spectra.io.roles import ROLES
from spectra.plan import format as plans
from spectra.plan import run


def cmd_plan_show(args) -> int:
    plan = plans.load(args.plan)
    model = open_model(args.model)
    entries = plans.resolve(plan, model.matrices, rank_of=plans.energy_ranks(model))
    warn_other_model(plan, model)
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
    totals = plans.totals(entries)
    if args.json:
        print(
            json.dumps(
                {"plan": str(args.plan), "model": args.model, "modules": rows, "totals": totals}
            )
        )
        return 0
    import polars as pl

    print(format_table(pl.DataFrame(rows)))
    print(
        f"\n{totals['compressed']} of {totals['modules']} linear modules compressed; "
        f"parameters {totals['params_before'] / 1e6:.2f}M -> {totals['params_after'] / 1e6:.2f}M "
        f"({totals['params_ratio']:.1%}); {totals['bits_per_param']:.2f} bits per parameter "
        f"({totals['size_mb_after']:.1f} MB)"
    )
    return 0


def cmd_plan_auto(args) -> int:
    # deferred: these pull in torch; `spectra --help` imports this module
    from spectra.plan import auto as autoplan
    from spectra.plan.defaults import DEFAULT_TARGET_PARAMS
    from spectra.plan.strategies import Strategy

    check_out_path(args.out, (".yaml", ".yml", ".json"))
    if args.target_params is None and args.target_bits is None:
        args.target_params = DEFAULT_TARGET_PARAMS
    floors = autoplan.parse_floors(args.min_rank, args.min_bits, args.keep_dense)
    strategy = Strategy(args.allocate, args.alpha_e, args.owl_band)  # bad knobs: exit 2
    # loaded (streamed where it must be) only if a damage is scored on it
    model = open_model(args.model, args.device, args.dtype, args.offload)
    sensitivity, settings, fallback = _auto_damage(args, model)
    with progress_bar(sensitivity) as progress:
        result = autoplan.auto_plan(
            model,
            args.method,
            args.target_params,
            args.target_bits,
            sensitivity,
            floors,
            settings,
            progress=progress,
            strategy=strategy,
        )
    fmt = "json" if args.out.suffix.lower() == ".json" else "yaml"
    body = plans.dumps(result.plan, fmt)
    s = result.summary()
    if fmt == "yaml":
        body = (
            f"# {shlex.join(['spectra', *args.argv])}\n"
            f"# params kept {s['params_ratio']:.4f}, {s['bits_per_param']:.3f} bits per "
            f"parameter, predicted damage {s['predicted_damage']:.6g}\n" + body
        )
        dense = [
            n
            for u, c in zip(result.units, result.chosen, strict=True)
            if c.config is None
            for n in u.names
        ]
        if dense:  # the plan format has no "dense" setting: say which modules stay so
            body += "# left dense:\n" + "".join(f"#   {n}\n" for n in dense)
    with cache.atomic_path(args.out) as tmp:
        tmp.write_text(body)
    if fallback:  # after the plan is made, so that bad input stays one line
        print(fallback, file=sys.stderr)
    used = _calibration_used(model, result.plan.calibration if sensitivity == "calib" else None)
    if args.json:
        print(json.dumps({"out": str(args.out), **s, "calibration": used}))
        return 0
    if used is not None:
        print(
            f"calibration: {used['tokens']:,} tokens of {used['corpus']} ({used['samples']} "
            f"windows of {used['seqlen']}, seed {used['seed']}), key {used['key']}"
        )
    what = {
        "none": "sum of squared relative weight errors",
        "fisher": "Fisher-predicted loss increase (nats/token)",
        "ppl": "probe-scaled loss increase (nats/token)",
        "calib": "calibration-weighted loss increase (nats/token)",
    }
    if result.allocate != "loss" and sensitivity == "calib":  # no loss weights asked for
        what["calib"] = "sum of relative calibration-weighted errors"
    rule = "" if result.allocate == "loss" else f", allocated by {result.allocate}"
    print(
        f"{args.out}: {s['compressed']} of {s['modules']} linear modules compressed with "
        f"{args.method}{rule}; parameters kept {s['params_ratio']:.1%}, "
        f"{s['bits_per_param']:.2f} bits per parameter "
        f"(budget {'params' if s['key'] == 'params' else 'bits'} "
        f"{s['spent']:,} of {s['budget']:,}); predicted damage {s['predicted_damage']:.4g} "
        f"({what[sensitivity]}); {s['seconds']['total']:.1f} s"
    )
    return 0


def _auto_damage(args, model):
    """(sensitivity, settings, warning) of `plan auto`: `auto` scores the
    calibration-weighted damage on the model's newest cached calibration, else on a small
    one computed first; a model that cannot be calibrated falls back to the weight error,
    with one warning line (None otherwise)."""
    from spectra.plan import sensitivity as sens
    from spectra.plan.defaults import FIRST_CALIB_TOKENS

    if args.sensitivity != "auto":
        if args.sensitivity not in sens.KINDS:
            return args.sensitivity, None, None  # `none`, or refused by auto_plan
        settings = sens.SensitivitySettings(args.sensitivity, tokens=args.tokens)
        return args.sensitivity, settings, None
    found = calibration.latest(model)
    if found is not None:  # scored on that calibration, whatever its settings
        c = found.settings
        return "calib", sens.SensitivitySettings("calib", c.corpus, c.tokens, c.seqlen), None
    try:
        model.tokenizer()
    except SpectraInputError as e:
        return (
            "none",
            None,
            (
                f"spectra: warning: no calibration ({e}): the damage is the data-free weight "
                f"error, far from the loss; run `spectra calibrate {shlex.quote(args.model)}` "
                "on a model with a tokenizer for a calibrated plan"
            ),
        )
    tokens = args.tokens or FIRST_CALIB_TOKENS
    return "calib", sens.SensitivitySettings("calib", tokens=tokens), None


def _calibration_used(model, settings) -> dict | None:
    """The calibration a plan was scored on: its settings, tokens and cache key."""
    if settings is None:
        return None
    grams = calibration.cached(model, settings)
    key = grams.folder.name if grams is not None else None
    tokens = grams.tokens if grams is not None else settings.tokens
    return dict(settings.windows_key, tokens=tokens, key=key)


def warn_other_model(plan, model) -> None:
    """One warning line when the plan names another model than --model."""
    spec = model.spec
    if plan.model is None or plan.model == spec:
        return
    a, b = Path(plan.model).expanduser(), Path(spec).expanduser()
    if a.exists() and b.exists() and a.resolve() == b.resolve():
        return
    print(
        f"spectra: warning: the plan was made for {plan.model}, not {spec}; its rules are "
        "matched by name, its layers entries checked by shape",
        file=sys.stderr,
    )


def _settings(config) -> str:
    """`method(knob=value, ...)` with the knobs that differ from the method's defaults."""
    if config is None:
        return "dense"
    fields = dataclasses.fields(config)
    # a knob whose default is None resolves from the others (quant's act_order and
    # observer follow gptq): it is compared with what it resolves to here
    try:
        ref = dataclasses.replace(config, **{f.name: None for f in fields if f.default is None})
    except (SpectraInputError, TypeError, ValueError):
        ref = None

    def default(f):
        return getattr(ref, f.name) if f.default is None and ref is not None else f.default

    knobs = [
        f"{f.name}={getattr(config, f.name)}"
        for f in fields
        if getattr(config, f.name) != default(f)
    ]
    return f"{config.method}({', '.join(knobs)})"


def cmd_apply(args) -> int:
    plan = plans.load(args.plan)
    out = args.out
    if out.exists() and not args.force:
        raise SpectraInputError(f"{out}: already exists (pass --force to replace it)")
    if not out.parent.is_dir():
        raise SpectraInputError(f"{out}: directory {out.parent} does not exist")
    # the plan must fit the model before anything heavy is loaded
    model = open_model(args.model, args.device, args.dtype, args.offload)
    rank_of = plans.energy_ranks(model)
    entries = plans.resolve(plan, model.matrices, rank_of=rank_of)
    warn_other_model(plan, model)
    # deferred: these pull in torch; `spectra --help` imports this module
    from compressors import apply as applying
    from compressors import io

    if model.offload == "disk":
        return _apply_streamed(args, model, plan, entries, rank_of)
    t0 = time.perf_counter()
    with _cluster(args.ray, model.device) as mapper:
        network = model.load()
        done = run.apply(
            model, plan, entries, network, rank_of=rank_of, mapper=mapper, bars=progress_bar
        )
    facts, tokenizer = done.factorizations, done.tokenizer
    rows = [applying.asdict(r) for r in done.reports]
    totals = plans.totals(entries)
    totals["seconds"] = time.perf_counter() - t0  # loading and compressing, not healing
    heal_section = None
    if plan.heal is not None:  # distil the compact parameters from the dense model
        from spectra.cli import heal

        identity = {"model": args.model, "plan": plans.plan_key(entries)}
        facts, heal_section = heal.run_heal(
            done.compressed,
            network,
            facts,
            tokenizer,
            plan.heal,
            plan.calibration.corpus,
            out,
            identity,
        )
    report = _report(args, plan, done, totals, rows)
    if heal_section is not None:
        report["heal"] = heal_section
    io.save(
        out,
        done.compressed,
        facts,
        args.plan.read_text(),
        report,
        tokenizer,
        args.dense,
        args.force,
    )
    if heal_section is not None:
        heal.finish(out)
    return _apply_done(args, out, totals, heal_section)


def _apply_done(args, out, totals, heal_section) -> int:
    if args.json:
        print(json.dumps({"out": str(out), **totals}))
        return 0
    print(
        f"{out}: {totals['compressed']} modules compressed in {totals['seconds']:.1f} s; "
        f"linear parameters {totals['params_before'] / 1e6:.2f}M -> "
        f"{totals['params_after'] / 1e6:.2f}M, "
        f"{totals['bits_per_param']:.2f} bits per parameter; report: {out / 'report.json'}"
    )
    if heal_section is not None:
        from spectra.cli import heal

        print(heal.summary(out, heal_section))
    return 0


def _report(args, plan, done, totals, rows) -> dict:
    return dict(
        model=args.model,
        plan=str(args.plan),
        calibration=dict(
            vars(plan.calibration),
            bos=done.tokenizer is not None and ev.bos_token(done.tokenizer) is not None,
        ),
        calibration_tokens=done.seq.get("tokens", 0) if done.grams is None else done.grams.tokens,
        calibration_cached=done.seq.get("cached") if done.seq else None,
        totals=totals,
        modules=rows,
    )


def _apply_streamed(args, model, plan, entries, rank_of) -> int:
    """`spectra apply` of a model streamed from disk: OUT is written block by block as
    the blocks are compressed (inside its temporary directory, renamed at the end)."""
    from compressors import apply as applying
    from compressors import blocks, io

    if plan.heal is not None:
        raise SpectraInputError(
            f"{args.plan}: heal trains the whole model on the device, which does not hold "
            f"{model.describe()['resident_gb']:.1f} GB; apply without heal: here, heal where "
            "it fits"
        )
    if args.dense:
        raise SpectraInputError(
            "--dense with a model streamed from disk: use `spectra export OUT --format hf`"
        )
    if args.ray is not None:
        raise SpectraInputError("--ray with a model streamed from disk: use --offload none")
    t0 = time.perf_counter()
    network = model.load()
    layers = blocks.decoder_layers(network)
    prefix = next(n for n, m in network.named_modules() if m is layers)
    with cache.atomic_dir(args.out, args.force) as tmp:
        writer = io.Writer(tmp)

        def on_block(block, model_, facts_):
            writer.part(model_, facts_, block, prefix if block is None else f"{prefix}.{block}")

        # one factorization at a time, on every core: a block's worth of n x n Hessian
        # factors at once would undo what streaming saves
        done = run.apply(
            model,
            plan,
            entries,
            network,
            rank_of=rank_of,
            mapper=_one_at_a_time,
            on_block=on_block,
            bars=progress_bar,
        )
        rows = [applying.asdict(r) for r in done.reports]
        totals = plans.totals(entries)
        totals["seconds"] = time.perf_counter() - t0
        report = _report(args, plan, done, totals, rows)
        report["run"] = model.describe()
        writer.finish(network, args.plan.read_text(), report, done.tokenizer)
    return _apply_done(args, args.out, totals, None)


def _one_at_a_time(fn, work):
    yield from map(fn, work)


@contextlib.contextmanager
def _cluster(address: str | None, device: str):
    """The factorizations' mapper: None (the local thread pool) or Ray tasks (with a
    GPU each when the model goes to cuda)."""
    if address is None:
        yield None
        return
    from spectra.linalg import cluster

    info = cluster.connect(address)
    try:
        on_gpu = device.startswith("cuda")
        if on_gpu and not info["gpus"]:
            raise SpectraInputError("--ray: the model is on cuda but the Ray cluster has no GPUs")
        yield functools.partial(cluster.task_map, num_gpus=1 if on_gpu else 0)
    finally:
        cluster.disconnect(info)


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
