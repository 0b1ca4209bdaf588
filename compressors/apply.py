"""Module surgery for every method, one place: resolved entries in, compact modules out.

`apply(model, entries, ...)` works on a deep copy (the source model is never
touched), replaces each entry's nn.Linear (or GPT-2 Conv1D) by its factorization's
compact module and returns the copy with a per-module report. Entries come already
resolved (`spectra.plan.resolve`, or `spectra.plan.apply_plan` for a whole plan):
compressors know nothing of plans. Data-aware settings (caldera, whitened lowrank,
joint, losparse and mpo, GPTQ, Wanda) read H = X^T X of their module's inputs from
`grams`, block by block ({block: {name: (H, rows)}}: compressors.activations.collect,
or the calibration cache of spectra.data.calibration, which reads one block at a
time), so that memory holds one block's Grams at once.
"""

from __future__ import annotations

import copy
import functools
import time
from dataclasses import asdict, dataclass
from typing import NamedTuple

import torch
from torch import nn

from compressors import blocks
from compressors.activations import block_grams
from compressors.base import Calibration, h_relative_error, relative_error
from compressors.registry import compress, groups, method_of, needs_data
from compressors.targets import Target, linear_targets
from spectra.errors import SpectraInputError
from spectra.linalg.parallel import sized_map

# also for the previews (spectra.preview builds modules exactly as apply does)
__all__ = [
    "Target",
    "apply",
    "compact_modules",
    "factorize",
    "linear_targets",
    "needs_data",
    "set_module",
]


@dataclass
class ModuleReport:
    name: str
    method: str
    settings: dict
    params_before: int
    params_after: int
    bits_before: int
    bits_after: int
    rel_error: float
    calib_error: float | None
    seconds: float


def apply(
    model,
    entries,
    grams=None,
    progress=None,
    calib_ids=None,
    on_grams=None,
    mapper=None,
    on_block=None,
):
    """(compressed model, reports, factorizations by module) for resolved `entries`.

    A resident model is compressed in a deep copy; a model streamed from disk
    (compressors.blocks) block by block, each block materialised while its modules are
    compressed, handed to `on_block(block, model, factorizations)` (the writer of OUT:
    block None is the modules outside the blocks), then released with its compact
    modules, so that memory holds one block.

    Args:
        entries: one per module of `model` (or fewer), each with `name`, `role`, `config`
            (None: stays dense), `block`, `source` (the members of one of
            compressors.registry.groups share one factorization) and the planned `params_before`,
            `params_after`, `bits_before`, `bits_after` that the report carries.
        grams: {block: {name: (H, rows)}} of the dense model's calibration inputs (any
            mapping read by block), needed when a data-aware method is planned.
        progress: called as progress(done, total, module name).
        calib_ids: calibration windows (windows, seqlen) for sequential calibration
            instead of `grams`: block by block, each block's H is taken from the
            outputs of the blocks before it as already compressed, then the block is
            compressed; `on_grams(block, grams)` receives each block's Grams.
        mapper: how a list of factorizations runs, `mapper(fn, work)` yielding
            `fn(w)` in order; by default the local thread pool (one per core, weights
            of 16.8M elements or more one at a time: `_local_map`), or
            spectra.linalg.cluster.task_map for Ray tasks. One list per block.
        on_block: required for a streamed model (see above); ignored otherwise.
    """
    streamed = blocks.is_streamed(model)
    if streamed and on_block is None:
        raise ValueError("a model streamed from disk is compressed into a writer (on_block)")
    if not streamed:
        model, on_block = copy.deepcopy(model).eval(), None
    targets = linear_targets(model)
    todo = [e for e in entries if e.config is not None]
    widths = {e.block: e.width for e in entries if getattr(e, "width", None) is not None}
    data = any(needs_data(e.config) for e in todo) or any(map(needs_data, widths.values()))
    if data and grams is None and calib_ids is None:
        raise SpectraInputError("this plan has data-aware settings: calibration is required")
    if data and any(needs_data(e.config) and e.block is None for e in todo):
        name = next(e.name for e in todo if needs_data(e.config) and e.block is None)
        raise SpectraInputError(
            f"{name}: data-aware methods are supported inside transformer blocks only"
        )
    state = _Run(model, targets, todo, progress, mapper or _local_map, on_block, widths)
    layers = blocks.decoder_layers(model)
    if data and calib_ids is not None:

        def compress_block(block: int, block_grams_: dict) -> None:
            if on_grams is not None:
                on_grams(block, block_grams_)
            state.compress_block(block, block_grams_)

        last = max(
            [e.block for e in todo if needs_data(e.config)]
            + [b for b, w in widths.items() if needs_data(w)]
        )
        # the next blocks' inputs go through dense stand-ins of the reconstructed weights
        # (the compact modules' forward up to float rounding, without the CPU's slow
        # sparse or per-call dequantizing matmuls); the compact modules go in after
        state.deferred = {}
        done = -1
        for done, _ in block_grams(model, calib_ids, after_block=compress_block):
            state.finish_block(done)
            if done == last and not streamed:  # later blocks' inputs are not needed
                break
        for name, module in state.deferred.items():  # a resident model's, all at once
            set_module(model, name, module)
        state.deferred = None
        for block in range(done + 1, len(layers) if streamed else 0):
            with blocks.onloaded(model, layers[block]):
                state.compress_block(block, None)
                state.finish_block(block)
    else:
        for block in range(len(layers)):
            mine = [e for e in state.todo.values() if e.block == block]
            if not streamed and not mine and block not in widths:
                continue
            aware = any(needs_data(e.config) for e in mine) or needs_data(widths.get(block))
            with blocks.onloaded(model, layers[block]):
                # H as stored (float32): each method widens the one it is using to
                # float64, so a block's Grams are never held twice
                state.compress_block(block, grams[block] if aware else None)
                state.finish_block(block)
    if on_block is None:
        state.compress_rest()
    else:  # one outer module at a time: an 8B's embeddings and head are 2 GB each in float32
        names = {id(m): n for n, m in model.named_modules()}
        done: list[str] = []
        for name in [names[id(m)] for m in blocks.outer_modules(model)]:
            if not name:  # onloading the model itself would materialise every block
                raise SpectraInputError(
                    "the model holds parameters of its own outside its blocks: apply it "
                    "resident (--offload none)"
                )
            if any(name.startswith(d + ".") for d in done):
                continue  # compressed and written within an outer module before it
            module = model.get_submodule(name)  # looked up now: an earlier turn swaps
            with blocks.onloaded(model, module):
                state.finish_outer(module)
            done.append(name)
        if state.todo:  # every linear module is in a block or an outer module
            raise SpectraInputError(f"{next(iter(state.todo))}: not reached by a streamed apply")
    return model, state.reports, state.factorizations


class _Run:
    """Bookkeeping of one apply: what is left, reports, module swapping."""

    def __init__(self, model, targets, todo, progress, mapper, on_block=None, widths=None):
        self.model, self.targets, self.progress, self.mapper = model, targets, progress, mapper
        self.on_block = on_block  # a streamed model's writer
        self.widths = dict(widths or {})  # {block: its width setting}, until applied
        self.narrowed: dict[int, list[str]] = {}  # a block's modules that width made anew
        self.todo = {e.name: e for e in todo}
        self.total = len(todo)
        self.reports: list[ModuleReport] = []
        self.factorizations: dict = {}
        self.deferred: dict | None = None  # {name: compact module} behind dense stand-ins

    def compress_entries(self, entries: list, grams: dict | None = None) -> None:
        units = groups(entries, lambda e: e.config.method, lambda e: e.source)
        jobs = [self._job(members, grams) for members in units]
        work = [
            _Work("+".join(e.name for e in j.members), j.config, j.weights, j.calib) for j in jobs
        ]
        for job, (f, seconds) in zip(jobs, self.mapper(_factorize, work), strict=True):
            self._install(job, f, seconds)

    def compress_rest(self) -> None:
        self.compress_entries(list(self.todo.values()))

    def compress_block(self, block: int, grams: dict | None) -> None:
        """Every entry of `block` (its data-aware ones read `grams`), after the block's
        width setting (which narrows its modules first)."""
        if block in self.widths:
            grams = self._narrow(block, self.widths.pop(block), grams)
        entries = [e for e in self.todo.values() if e.block == block]
        if entries:
            self.compress_entries(entries, grams)

    def finish_block(self, block: int) -> None:
        """A streamed model's block is complete: its compact modules go in (behind the
        dense stand-ins of sequential calibration until now), the writer takes it, and
        its compact modules are released (to the meta device) with it."""
        if self.on_block is None:
            return
        prefix = f"{self.layers_prefix}.{block}."
        if self.deferred:
            for name in [n for n in self.deferred if n.startswith(prefix)]:
                set_module(self.model, name, self.deferred.pop(name))
        self._write(block, [n for n in self.factorizations if n.startswith(prefix)])
        for name in self.narrowed.pop(block, ()):  # written: released like the rest
            self.model.get_submodule(name).to("meta")

    def _narrow(self, block: int, config, grams: dict | None) -> dict | None:
        """Apply `block`'s width setting; the Grams its new modules read (down_proj's on
        the kept neurons, exact; o_proj's on its heads' new order, the dense model's)."""
        from compressors import width_model

        info = width_model.shrink_block(self.model, block, config, grams or {})
        prefix = f"{self.layers_prefix}.{block}."
        for name in [n for n in self.targets if n.startswith(prefix)]:
            target, old = self.targets.pop(name)
            try:
                module = self.model.get_submodule(name)
            except AttributeError:  # a removed sublayer's
                continue
            shape = tuple(module.weight.shape)
            self.targets[name] = (Target(name, shape, target.role, block, False), module)
            if module is not old:  # made anew: not the offloader's to release
                self.narrowed.setdefault(block, []).append(name)
        return width_model.narrowed_grams(self.model, block, info, grams)

    def finish_outer(self, module) -> None:
        """A streamed model's module outside the blocks, materialised: the entries within
        it are compressed, the writer takes what is materialised and not yet written
        (block None), and its compact modules are released."""
        inside = {id(m) for m in module.modules()}
        mine = [e for e in self.todo.values() if id(self.targets[e.name][1]) in inside]
        if mine:
            self.compress_entries(mine)
        self._write(None, [e.name for e in mine if e.name in self.factorizations])

    def _write(self, block: int | None, names: list[str]) -> None:
        """The writer takes `block` with the factorizations of `names`; then their
        compact modules' tensors are freed (to the meta device)."""
        self.on_block(block, self.model, {n: self.factorizations[n] for n in names})
        for name in names:
            self.model.get_submodule(name).to("meta")
            del self.factorizations[name]

    @functools.cached_property
    def layers_prefix(self) -> str:
        """The module-name prefix of the blocks (e.g. model.layers)."""
        return blocks.layers_name(self.model)

    def _job(self, members: list, grams) -> _Job:
        config = members[0].config
        mods = [self.targets[e.name][1] for e in members]
        weights = [self.targets[e.name][0].weight(m) for e, m in zip(members, mods, strict=True)]
        calib = None
        if grams is not None and needs_data(config):
            if members[0].name not in grams:
                raise SpectraInputError(f"{members[0].name}: the calibration has no H for it")
            h, count = grams[members[0].name]
            calib = Calibration(h, count)
        return _Job(members, config, mods, weights, calib)

    def _install(self, job: _Job, f, seconds: float) -> None:
        members, config, mods, weights, calib = job
        new = compact_modules(f, config, mods)
        dense = [f.member_dense(i) for i in range(len(members))]
        for e, w, d, module, old in zip(members, weights, dense, new, mods, strict=True):
            if self.deferred is None:
                set_module(self.model, e.name, module)
            else:
                self.deferred[e.name] = module
                set_module(self.model, e.name, _stand_in(old, d, w))
            self.factorizations[e.name] = f
            self.reports.append(
                ModuleReport(
                    e.name,
                    config.method,
                    asdict(config),
                    e.params_before,
                    e.params_after,
                    e.bits_before,
                    e.bits_after,
                    relative_error(w, d),
                    _calib_rel(w, d, calib),
                    seconds / len(members),
                )
            )
            del self.todo[e.name]
            if self.progress:
                self.progress(self.total - len(self.todo), self.total, e.name)


class _Job(NamedTuple):
    members: list  # entries
    config: object
    mods: list[nn.Module]
    weights: list[torch.Tensor]
    calib: Calibration | None


class _Work(NamedTuple):
    """What one factorization reads (a task's whole input: no module, no model)."""

    name: str  # the module, or a joint group's members joined by +
    config: object
    weights: list[torch.Tensor]
    calib: Calibration | None


def _local_map(fn, work: list) -> list:
    """The default mapper: one factorization per core, those of 16.8M-element weights
    or more (an 8B model's) one at a time on every core (spectra.linalg.parallel)."""
    return sized_map(fn, work, lambda w: max(x.numel() for x in w.weights))


def _factorize(job: _Work):
    """(factorization, seconds) of one module or one joint group."""
    t0 = time.perf_counter()
    f = factorize(job.config, job.weights, job.calib)
    return f, time.perf_counter() - t0


def factorize(config, weights: list[torch.Tensor], calib=None):
    """The factorization of one module's weight, or of a joint group's weights, as
    `apply` computes it (on the weights' device; see registry.compress).

    Args:
        config: the module's method config (e.g. from registry.make_config).
        weights: the (out, in) weight, or a grouped method's (joint) members' weights.
        calib: the module's compressors.base.Calibration, for data-aware settings.

    Returns:
        The method's Factorization.
    """
    return compress(weights if method_of(config).grouped else weights[0], config, calib)


def compact_modules(f, config, dense: list[nn.Module]) -> list[nn.Module]:
    """The compact modules that `apply` puts in place of `dense`.

    Args:
        f: the Factorization of `dense` under `config` (see `factorize`).
        config: the method config `f` was made with.
        dense: the replaced module, or a grouped method's members in `factorize`'s order.

    Returns:
        One compact module per dense one, each keeping its dense module's bias.
    """
    biases = [m.bias.detach() if m.bias is not None else None for m in dense]
    return f.member_modules(biases)


def _stand_in(old: nn.Module, dense: torch.Tensor, weight: torch.Tensor) -> nn.Linear:
    """An nn.Linear holding the reconstructed weight, with `old`'s bias."""
    out, inp = weight.shape
    bias = getattr(old, "bias", None)
    lin = nn.Linear(inp, out, bias=bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        lin.weight.copy_(dense.reshape(out, inp).to(weight.dtype))
        if bias is not None:
            lin.bias.copy_(bias)
    return lin.requires_grad_(False)


def set_module(model, name: str, module: nn.Module) -> None:
    """Put `module` at the dotted `name` of `model`."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _calib_rel(w, d, calib) -> float | None:
    if calib is None:
        return None
    w, d = w.detach().cpu(), d.detach().cpu()  # beside H, which stays on the CPU
    return h_relative_error(w, d, calib.hessian)
