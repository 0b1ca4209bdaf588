"""Running a plan: `apply(model, plan)`, the one pipeline `spectra apply` and the app use.

`apply_plan` is the module surgery on a loaded network (resolve the plan against its
own linear modules, compress, swap). `apply` is the whole step on a resolved model
(spectra.io.model.Model): the tokenizer when the plan needs data, the calibration
(the cached dense Grams, or sequential: each block on the outputs of the compressed
blocks before it), then the surgery; a streamed model hands each finished block to
`on_block` (OUT's writer).
"""

from __future__ import annotations

import contextlib
import functools
import time
from dataclasses import dataclass, field

from spectra.analysis import spectra_by_name
from spectra.data import calibration
from spectra.errors import SpectraInputError
from spectra.io import cache
from spectra.io.model import Model
from spectra.linalg.metrics import energy_rank
from spectra.linalg.svd import singular_values
from spectra.plan.block_plan import heads_of
from spectra.plan.format import Entry, Plan, PlanError, resolve


@dataclass
class Applied:
    """What `apply` made: the compressed network, its per-module reports and
    factorizations, the calibration read (None: none, or sequential), the sequential
    calibration's facts (`seq`: folder, hit, tokens), the tokenizer and the seconds."""

    compressed: object
    reports: list
    factorizations: dict
    tokenizer: object = None
    grams: object = None
    seq: dict = field(default_factory=dict)
    seconds: float = 0.0


def _no_bar(label: str, unit: str = "it"):
    return contextlib.nullcontext(None)


def apply(
    model: Model,
    plan: Plan,
    entries: list[Entry],
    network,
    *,
    rank_of=None,
    mapper=None,
    on_block=None,
    bars=_no_bar,
) -> Applied:
    """Compress `network` (the loaded `model`, dense; kept as it is) by `plan`, whose
    `entries` were resolved against the model's matrices.

    `bars(label, unit)`: a context manager giving each phase's progress callback (the
    CLI's progress bars); `mapper`: where factorizations run (Ray tasks, one at a time);
    `on_block(block, network, factorizations)`: hears each block of a streamed model
    once it is compressed."""
    from compressors import apply as applying  # deferred: torch

    t0 = time.perf_counter()
    needs_data = any(applying.needs_data(e.config) or applying.needs_data(e.width) for e in entries)
    # a data-free plan needs no tokenizer; OUT then has none either
    tokenizer = model.tokenizer() if needs_data or model.has_tokenizer() else None
    surgery = functools.partial(
        apply_plan, network, plan, rank_of=rank_of, mapper=mapper, on_block=on_block
    )
    grams, seq = None, {}
    if needs_data and plan.calibration.sequential:
        # each block calibrated on the outputs of the blocks before it as compressed
        with bars("compressing (sequential calibration)") as progress:
            compressed, reports, facts = calibration.sequential(
                model,
                plan.calibration,
                plan_key(entries),
                functools.partial(surgery, progress=progress),
                info=seq,
            )
    else:
        if needs_data:
            with bars("calibrating", unit="block") as progress:
                grams = calibration.calibrate(
                    model, plan.calibration, network=network, progress=progress
                )
        with bars("compressing") as progress:
            compressed, reports, facts = surgery(grams=grams, progress=progress)
    return Applied(compressed, reports, facts, tokenizer, grams, seq, time.perf_counter() - t0)


def apply_plan(
    model,
    plan: Plan,
    grams=None,
    progress=None,
    rank_of=None,
    calib_ids=None,
    on_grams=None,
    mapper=None,
    on_block=None,
):
    """(compressed copy, reports, factorizations) of `plan` on a loaded `model`: the plan
    resolved against the model's own linear modules, then compressors' module surgery.

    `rank_of(name, energy)` sizes energy-based settings; by default from the weights.
    `calib_ids`/`on_grams`: sequential calibration; `mapper`: where factorizations run;
    `on_block`: a streamed model's writer (compressors.apply.apply).
    """
    from compressors import apply as applying  # deferred: torch (`spectra --help`)

    targets = applying.linear_targets(model)
    entries = resolve(
        plan,
        [t for t, _ in targets.values()],
        rank_of or weight_ranks(targets),
        heads=heads_of(model.config),
    )
    try:
        return applying.apply(
            model,
            entries,
            grams=grams,
            progress=progress,
            calib_ids=calib_ids,
            on_grams=on_grams,
            mapper=mapper,
            on_block=on_block,
        )
    except PlanError:
        raise
    except SpectraInputError as e:  # what the surgery refuses is this plan's doing
        raise PlanError(str(e)) from e


def energy_ranks(model):
    """rank_of(name, energy) from the cached spectra of `model` (spectra.io.model.Model),
    computed on first need."""
    cache: dict = {}

    def rank_of(name: str, energy: float) -> int:
        if "df" not in cache:
            cache["df"] = spectra_by_name(model)

        return energy_rank(cache["df"][name], energy)

    return rank_of


def weight_ranks(targets, read=None):
    """rank_of(name, energy) from the singular values of each module's own weight
    (`targets`: compressors.apply.linear_targets of a loaded model; `read(name)`: the
    (out, in) weight, when it must be read rather than taken from the module)."""
    import functools

    if read is None:

        def read(name):
            target, module = targets[name]
            return target.weight(module)

    @functools.cache
    def sigma(name):
        return singular_values(read(name).double().numpy())

    def rank_of(name, energy):
        return energy_rank(sigma(name), energy)

    return rank_of


def plan_key(entries) -> str:
    """A hash of resolved settings: what a sequential calibration's Grams depend on."""
    from compressors.base import config_to_dict

    return cache.key(
        [(e.name, config_to_dict(e.config)) for e in entries if e.config is not None]
        + [(e.name, config_to_dict(e.width)) for e in entries if e.width is not None]
    )
