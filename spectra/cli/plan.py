"""`spectra plan show` and `spectra plan auto`: a plan resolved on a model, and one made
for a budget."""

from __future__ import annotations

import dataclasses
import json
import shlex
import sys
from pathlib import Path

from spectra.cli.progress import progress_bar
from spectra.cli.report import check_out_path, format_table
from spectra.data import calibration
from spectra.errors import SpectraInputError
from spectra.io import cache
from spectra.io.model import open_model
from spectra.io.roles import ROLES
from spectra.plan import format as plans
from spectra.plan import run
from spectra.plan.block_plan import heads_of


def cmd_plan_show(args) -> int:
    plan = plans.load(args.plan)
    model = open_model(args.model)
    entries = plans.resolve(
        plan, model.matrices, rank_of=run.energy_ranks(model), heads=heads_of(model.config)
    )
    warn_other_model(plan, model)
    order = {r: i for i, r in enumerate(ROLES)}
    entries.sort(key=lambda e: (-1 if e.block is None else e.block, order.get(e.role, 99)))
    rows = [
        dict(
            module=e.name,
            rule=" + ".join(s for s in (e.width_source, e.source) if s) or "-",
            method=_with_width(e),
            shape=_shape(e),
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
    from spectra.plan.sensitivity import KINDS
    from spectra.plan.strategies import RULES, Strategy

    check_out_path(args.out, (".yaml", ".yml", ".json"))
    if args.target_params is None and args.target_bits is None:
        args.target_params = DEFAULT_TARGET_PARAMS
    if args.method == "width":
        return _plan_auto_width(args)
    if args.multiple is not None or args.uniform or args.no_anchor:
        given = (("--multiple", args.multiple is not None), ("--uniform", args.uniform))
        flag = next((f for f, on in given if on), "--no-anchor")
        raise SpectraInputError(f"{flag} is for --method width (its MLP widths)")
    floors = autoplan.parse_floors(args.min_rank, args.min_bits, args.keep_dense, args.preset)
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
    calibrated = sensitivity != "none" and KINDS[sensitivity].calibrated
    used = _calibration_used(model, result.plan.calibration if calibrated else None)
    if args.json:
        print(json.dumps({"out": str(args.out), **s, "calibration": used}))
        return 0
    if used is not None:
        print(
            f"calibration: {used['tokens']:,} tokens of {used['corpus']} ({used['samples']} "
            f"windows of {used['seqlen']}, seed {used['seed']}), key {used['key']}"
        )
    by_loss = RULES[result.allocate].by_loss
    what = "sum of squared relative weight errors"
    if sensitivity != "none":
        kind = KINDS[sensitivity]  # a rule strategy asks for no loss weights
        what = kind.what if by_loss or kind.relative is None else kind.relative
    rule = "" if by_loss else f", allocated by {result.allocate}"
    print(
        f"{args.out}: {s['compressed']} of {s['modules']} linear modules compressed with "
        f"{args.method}{rule}; parameters kept {s['params_ratio']:.1%}, "
        f"{s['bits_per_param']:.2f} bits per parameter "
        f"(budget {'params' if s['key'] == 'params' else 'bits'} "
        f"{s['spent']:,} of {s['budget']:,}); predicted damage {s['predicted_damage']:.4g} "
        f"({what}); {s['seconds']['total']:.1f} s"
    )
    return 0


def _plan_auto_width(args) -> int:
    """`plan auto --method width`: each block's MLP width (spectra.plan.width_auto), on the
    model's newest calibration (or a first small one); uniform without one is data-free."""
    from spectra.plan import width_auto
    from spectra.plan.defaults import FIRST_CALIB_TOKENS

    if args.target_bits is not None:
        raise SpectraInputError("--target-bits with --method width: width sets parameters")
    model = open_model(args.model, args.device, args.dtype, args.offload)
    # an unsupported architecture or budget: refused before calibrating
    multiple = width_auto.MULTIPLE if args.multiple is None else args.multiple
    width_auto.check(model, args.target_params, args.allocate, multiple)
    grams = None
    if args.sensitivity != "none":
        found = calibration.latest(model)
        try:
            spec = (
                found.settings
                if found is not None
                else calibration.for_model(model, tokens=args.tokens or FIRST_CALIB_TOKENS)
            )
            with progress_bar("calibrating", unit="block") as progress:
                grams = calibration.calibrate(model, spec, progress=progress)
        except SpectraInputError:
            if args.allocate != "uniform":
                raise
    importance = None
    if args.allocate == "loss" and grams is not None:  # the damage in loss units
        from spectra.plan.sensitivity import importance_of

        with progress_bar("output Fisher", unit="block") as progress:
            importance = importance_of(model, grams, progress=progress)
    with progress_bar(f"width ({args.allocate})", unit="block") as progress:
        plan, facts = width_auto.width_plan(
            model, args.target_params, args.allocate, grams, multiple, progress,
            importance, args.uniform, not args.no_anchor,
        )  # fmt: skip
    fmt = "json" if args.out.suffix.lower() == ".json" else "yaml"
    body = plans.dumps(plan, fmt)
    if fmt == "yaml":
        body = f"# {shlex.join(['spectra', *args.argv])}\n" + body
    with cache.atomic_path(args.out) as tmp:
        tmp.write_text(body)
    summary = dict(out=str(args.out), **{k: facts[k] for k in ("allocate", "params_ratio")})
    summary["blocks_narrowed"] = len(plan.layers)
    if args.json:
        print(json.dumps(summary))
        return 0
    print(
        f"{args.out}: {len(plan.layers)} blocks narrowed by width ({args.allocate}); "
        f"linear parameters kept {facts['params_ratio']:.1%}; {facts['seconds']:.1f} s"
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


def _with_width(e) -> str:
    """The module's settings, after its block's width setting when it has one."""
    if e.width is None:
        return _settings(e.config)
    if e.removed:
        return f"{_settings(e.width)}: removed"
    return _settings(e.width) + ("" if e.config is None else f" + {_settings(e.config)}")


def _shape(e) -> str:
    """out x in, and what width leaves of it."""
    shape = f"{e.shape[0]}x{e.shape[1]}"
    after = e.shape_after or e.shape
    return shape if tuple(after) == tuple(e.shape) else f"{shape} -> {after[0]}x{after[1]}"


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
