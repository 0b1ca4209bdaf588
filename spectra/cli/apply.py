"""`spectra apply`: a plan run on a model (resident, or streamed a block at a time) into OUT."""

from __future__ import annotations

import contextlib
import functools
import json
import time

from spectra.cli.plan import warn_other_model
from spectra.cli.progress import progress_bar
from spectra.data import perplexity as ev
from spectra.errors import SpectraInputError
from spectra.io import cache
from spectra.io.model import open_model
from spectra.plan import format as plans
from spectra.plan import run
from spectra.plan.block_plan import heads_of


def cmd_apply(args) -> int:
    plan = plans.load(args.plan)
    out = args.out
    if out.exists() and not args.force:
        raise SpectraInputError(f"{out}: already exists (pass --force to replace it)")
    if not out.parent.is_dir():
        raise SpectraInputError(f"{out}: directory {out.parent} does not exist")
    # the plan must fit the model before anything heavy is loaded
    model = open_model(args.model, args.device, args.dtype, args.offload)
    rank_of = run.energy_ranks(model)
    entries = plans.resolve(plan, model.matrices, rank_of=rank_of, heads=heads_of(model.config))
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

        identity = {"model": args.model, "plan": run.plan_key(entries)}
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
