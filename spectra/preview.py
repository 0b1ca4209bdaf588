"""Live previews for an edited plan: one module's error, and an incremental perplexity.

`module_error` gives a module's relative weight error under a setting: from a
closed form where its method has one (low rank: the spectrum's tail energy,
Eckart-Young), else from one compression of that matrix. `Previewer` keeps a working
copy of the model (or works on a model streamed from disk, one block materialised at
a time, as `spectra eval` runs it) and, for each preview, swaps in only the modules
whose settings changed since the last one (each distinct (module, setting) is
compressed once and kept), then scores the evaluation tokens block by block. It
records every block's output for those tokens: blocks before the first changed one
are skipped and their recorded outputs feed the first changed block, so one changed
module in block b costs the blocks from b on, the final norm and the head. The
perplexity is the `spectra eval` convention on the first `tokens` of the evaluation
part (same windows, same batches), so `spectra eval OUT --max-tokens N` of the
applied plan reproduces it.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from compressors import blocks
from compressors.apply import (
    compact_modules,
    factorize,
    linear_targets,
    set_module,
)
from compressors.base import Calibration, h_relative_error, relative_error
from compressors.registry import METHODS, compress, groups, needs_data
from spectra import preview_width
from spectra.data import perplexity as ev
from spectra.errors import SpectraInputError
from spectra.plan.format import Plan, resolve
from spectra.plan.run import weight_ranks


def module_error(weight: np.ndarray | torch.Tensor | None, config, sigma=None) -> float:
    """Relative Frobenius error ||W - W_hat|| / ||W|| of `config` on one (out, in) weight.

    For a plain low-rank setting the singular values `sigma` suffice (weight may be None).
    """
    return module_errors(weight, config, sigma)[0]


def module_errors(weight, config, sigma=None, calib=None, curves=None):
    """(weight error, calibration-weighted error or None) of `config` on one weight.

    The weight error is ||W - W_hat||_F / ||W||_F; with `calib` (the module's
    compressors.base.Calibration) the calibration-weighted one is
    ||(W - W_hat) X^T||_F / ||W X^T||_F. Plain low rank reads `sigma` (weight may then be
    None when there is no calib); whitened low rank reads `curves` (its method's
    `curves(W, H)`) when given; everything else is one compression, exactly as
    `spectra apply` builds it. Data-aware settings without `calib` are an input error.
    """
    if config is None:
        return 0.0, (0.0 if calib is not None else None)
    method = METHODS[config.method]
    if method.errors is not None:
        got = method.errors(config, weight, sigma, calib, curves)
        if got is not None:
            return got
    w = torch.as_tensor(np.asarray(weight)).float()
    if method.alone is not None:  # a group's member alone (joint: its own rank-k SVD)
        config = method.alone(config, tuple(w.shape))
    if needs_data(config) and calib is None:
        raise SpectraInputError(
            f"{config.method}: a data-aware setting; its error shows once a calibration "
            "is computed (spectra calibrate)"
        )
    w_hat = compress(w, config, calib if needs_data(config) else None).to_dense()
    weight_err = float(relative_error(w, w_hat))
    if calib is None:
        return weight_err, None
    return weight_err, h_relative_error(w, w_hat, calib.hessian) or 0.0


@dataclass
class PreviewResult:
    ppl: float
    dense_ppl: float
    tokens: int
    changed: list[str]
    recompressed: int
    first_block: int | None  # first block that ran; None when nothing changed
    seconds: float


class Previewer(preview_width.WidthBlocks):
    """Incremental perplexity previews of per-module settings on one model."""

    def __init__(
        self, model, tokenizer, corpus: str = "builtin", seqlen: int = 512, built=None, grams=None
    ):
        """`built`: a store of compressed modules to share (e.g. between app sessions);
        `grams`: the model's calibration (spectra.data.calibration.Grams, or any
        {block: {name: (H, rows)}}), which data-aware settings are compressed with,
        exactly as `spectra apply` does."""

        # the caller's model is never touched; a streamed one is a skeleton of its own
        self.streamed = blocks.is_streamed(model)
        self.work = (model if self.streamed else copy.deepcopy(model)).eval()
        self.targets = linear_targets(self.work)  # name -> (Target, dense module)
        # energy settings: the weight's own spectrum
        self.rank_of = weight_ranks(self.targets, read=self._dense_weight)
        self.layers = blocks.decoder_layers(self.work)
        self._captured: blocks.Captured | None = None  # block inputs of the scored windows
        self._batches: list[torch.Tensor] = []
        self.ids = ev.token_stream(tokenizer, corpus, "eval")
        self.seqlen = seqlen
        self.current: dict[str, object] = {}  # name -> installed config
        self.built: dict[tuple, list[nn.Module]] = {} if built is None else built
        self.records: dict[int, list] | None = None  # tokens -> per-block outputs
        self.tokens: int | None = None
        self.dense_ppl: dict[int, float] = {}
        self.history: list[PreviewResult] = []
        self.grams = grams
        self._blocks: dict[int, dict] = {}  # the calibration block read last, as stored
        # width: {block: the key of the narrowed block installed}, {block: its original}
        self.block_current: dict[int, tuple] = {}
        self._originals: dict[int, nn.Module] = {}
        self._prefix = blocks.layers_name(self.work)

    def use_calibration(self, grams) -> None:
        """Data-aware settings from now on read `grams` (modules built with another
        calibration are rebuilt when next previewed)."""
        if grams is not self.grams:
            self.grams, self._blocks = grams, {}
            self.current = {n: c for n, c in self.current.items() if not needs_data(c)}

    def calibration(self, name: str) -> Calibration | None:
        """The module's calibration (None without one, or outside the blocks): its H
        widened to float64 for this use, from the block's Grams as stored (one block
        held: 1 GB of float32 on 8B shapes; the whole block in float64 was 2 GB more)."""
        if not self._has_calibration(name):
            return None
        block = self.targets[name][0].block
        stored = self._blocks.get(block)
        if stored is None:
            stored = self.grams[block]
            self._blocks = {block: stored}
        h, rows = stored[name]
        return Calibration(h.to(torch.float64), rows)

    def _has_calibration(self, name: str) -> bool:
        block = self.targets[name][0].block
        return self.grams is not None and block is not None and block in self.grams

    def _calibration_tag(self) -> str | None:
        folder = getattr(self.grams, "folder", None)
        return None if self.grams is None else str(folder or id(self.grams))

    def _units(
        self, layers: dict[str, object], current: dict | None = None
    ) -> tuple[list[str], dict[tuple, object]]:
        """(changed names, {unit: config}): the modules whose setting differs from what
        is installed, each as its unit (a module, or its whole joint group).

        `layers` is resolved like any plan (unknown modules and impossible settings are
        errors; joint members form their parent's group, as `spectra apply` builds it).
        `current`: what is taken as installed (default: what is).
        """
        current = self.current if current is None else current
        # a block narrowed by width is built whole (_width_changes); its modules wait
        modules, widths = preview_width.split(layers, self._prefix)
        layers = {
            n: c
            for n, c in modules.items()
            if n not in self.targets or self.targets[n][0].block not in widths
        }  # an unknown name stays: resolve names it
        resolved = resolve(Plan(layers=layers), [t for t, _ in self.targets.values()], self.rank_of)
        entries = {e.name: e for e in resolved}
        changed = [
            n
            for n in self.targets
            if current.get(n) != layers.get(n) and self.targets[n][0].block not in widths
        ]
        bad = [
            n
            for n in changed
            if layers.get(n) is not None and needs_data(layers[n]) and not self._has_calibration(n)
        ]
        if bad:
            where = "has no calibration" if self.grams is None else "is outside the blocks"
            raise SpectraInputError(
                f"{bad[0]}: {layers[bad[0]].method} is data-aware and the preview {where} "
                "(spectra calibrate)"
            )
        # a module leaving a group changes what the group shares (joint's V): rebuild its rest
        mods = [t for t, _ in self.targets.values()]
        installed = groups(mods, lambda t: current.get(t.name) and current[t.name].method)
        regroup = [
            t.name
            for unit in installed
            if len(unit) > 1 and any(t.name in changed for t in unit)
            for t in unit
            if t.name not in changed
        ]
        unit_of = {
            e.name: tuple(x.name for x in unit)
            for unit in groups(resolved, lambda e: e.config and e.config.method, lambda e: e.source)
            for e in unit
        }
        units: dict[tuple[str, ...], object] = {}
        for n in changed + regroup:
            units[unit_of[n]] = entries[n].config
        return changed, units

    def _key(self, names: tuple[str, ...], config) -> tuple:
        return (names, config, self._calibration_tag() if needs_data(config) else None)

    def _dense_weight(self, name: str) -> torch.Tensor:
        """The (out, in) dense weight of `name` (read from disk when streamed)."""
        target, module = self.targets[name]
        with blocks.onloaded(self.work, module):
            return target.weight(module).clone() if self.streamed else target.weight(module)

    def _build(self, names: tuple[str, ...], config) -> list[nn.Module]:
        """The compact modules of one unit under `config`, exactly as `spectra apply`
        (a streamed model's dense modules are read for the duration)."""
        dense = [self.targets[n][1] for n in names]
        if self.targets[names[0]][0].block is None:
            self._blocks = {}  # a head's weight (2.1 GB on 8B shapes) without Grams beside it
        calib = self.calibration(names[0]) if needs_data(config) else None
        with blocks.onloaded(self.work, *dense):
            weights = [self.targets[n][0].weight(d) for n, d in zip(names, dense, strict=True)]
            return compact_modules(factorize(config, weights, calib), config, dense)

    def prebuild(self, layers: dict[str, object], progress=None) -> int:
        """Compress every module of `layers` not in the store yet (one per core;
        matrices of SERIAL_NUMEL elements or more one at a time), installing nothing:
        the next preview of `layers` only evaluates. Returns the number of compressions.
        `progress(done, total, what)` hears each one."""
        from spectra.linalg.parallel import map_by_size

        _, units = self._units(layers)
        todo = [
            (n, c) for n, c in units.items() if c is not None and self._key(n, c) not in self.built
        ]
        # big matrices one at a time on every core, as `spectra apply` compresses them
        built = map_by_size(lambda u: self._build(*u), todo, lambda u: self._size(u[0]))
        for i, (unit, modules) in enumerate(built):
            self.built[self._key(*unit)] = modules
            if progress:
                progress(i + 1, len(todo), f"compressing {unit[0][0]}")
        self._blocks = {}  # the last block's Grams (1 GB on 8B shapes): not kept
        return len(todo)

    def _size(self, names: tuple[str, ...]) -> int:
        """The unit's largest weight, in elements."""
        return max(self.targets[n][0].shape[0] * self.targets[n][0].shape[1] for n in names)

    def pending(self, layers: dict[str, object], tokens: int = 2048) -> dict[str, int]:
        """What `preview(layers, tokens)` will run, phase by phase, as its progress names
        them: {"dense": baseline blocks, "compressing": compressions, "block": blocks}."""
        n = len(self.layers)
        baseline = tokens not in self.dense_ppl
        changed, units = self._units(layers, {} if baseline else None)
        todo = sum(c is not None and self._key(u, c) not in self.built for u, c in units.items())
        wide = self._width_changes(layers, {} if baseline else None)
        changed += [f"{self._prefix}.{i}" for i, _ in wide]
        todo += sum(key is not None and key not in self.built for _, key in wide)
        fresh = baseline or (self.records is not None and self.tokens == tokens)
        first = self._first_block(changed, fresh)
        if first is None:  # nothing changed: the last result, or a first score
            first = n if self.history else 0
        return {"dense": n if baseline else 0, "compressing": todo, "block": n - first}

    def _first_block(self, changed: list[str], fresh: bool) -> int | None:
        """The first block a score must run: 0 without records of these tokens (or with
        a changed module outside the blocks), else the first changed block; None when
        nothing changed."""
        if not fresh:
            return 0
        if not changed:
            return None
        known = [self.targets[c][0].block if c in self.targets else self._index(c) for c in changed]
        return 0 if None in known else min(known)

    def _install(self, layers: dict[str, object], progress=None) -> tuple[list[str], int]:
        """Swap in the modules whose setting changed; returns (changed names, compressions)."""
        changed, units = self._units(layers)
        wide = [f"{self._prefix}.{i}" for i, _ in self._width_changes(layers)]
        compressions = self._install_widths(layers, progress)
        changed = changed + wide
        for i, (names, config) in enumerate(units.items()):
            if progress:
                progress(i, len(units), f"compressing {names[0]}")
            if config is None:
                set_module(self.work, names[0], self.targets[names[0]][1])
                self.current.pop(names[0], None)
                continue
            key = self._key(names, config)
            if key not in self.built:
                self.built[key] = self._build(names, config)
                compressions += 1
            for n, module in zip(names, self.built[key], strict=True):
                set_module(self.work, n, module)
                self.current[n] = layers[n]
        return changed, compressions

    def preview(
        self, layers: dict[str, object], tokens: int = 2048, progress=None
    ) -> PreviewResult:
        """Perplexity of the model with `layers` (module name -> config) on `tokens`.

        `progress(done, total, what)` hears each compression and each block run (per
        batch of windows). It may raise to cancel: the previewer stays consistent (the
        next preview recomputes what the cancelled one left unfinished).
        """
        t0 = time.perf_counter()
        batches = self.ids.windows(self.seqlen, tokens)
        if tokens not in self.dense_ppl:
            self._install({})
            self.records, self.tokens = None, None
            self.dense_ppl[tokens] = self._score(batches, 0, progress, "dense baseline")
            self.tokens = tokens
        try:
            changed, compressions = self._install(layers, progress)
        except BaseException:  # cancelled halfway: the records no longer match the modules
            self.records = None
            raise
        if self.tokens != tokens:
            self.records = None
        first = self._first_block(changed, self.records is not None)
        if first is not None:
            ppl = self._score(batches, first, progress)
            self.tokens = tokens
        else:
            ppl = self.history[-1].ppl if self.history else self._score(batches, 0, progress)
        result = PreviewResult(
            ppl,
            self.dense_ppl[tokens],
            int(batches.numel()),
            changed,
            compressions,
            first,
            time.perf_counter() - t0,
        )
        self.history.append(result)
        return result

    def _score(self, batches, first: int, progress=None, what: str = "", batch_size: int = 4):
        """`spectra eval`'s perplexity, block by block as eval runs it: blocks before
        `first` are skipped (their recorded outputs feed block `first`), the others run
        over every batch in turn (materialised one at a time when the model is streamed)
        and their outputs are recorded; the head scores the final hidden states.

        Until it completes, no records are kept: an interrupted score leaves the next
        preview to start from block 0.
        """
        import math

        old, self.records = self.records, None
        n = len(self.layers)
        if first and (old is None or self._captured is None):
            first = 0
        if first == 0:
            device = blocks.working_device(self.work)
            xs = [
                batches[lo : lo + batch_size].to(device)
                for lo in range(0, len(batches), batch_size)
            ]
            self._captured = blocks.capture(self.work, xs)
            self._batches = xs
        new = {i: old[i] for i in range(first)}
        hidden = self._captured.hidden if first == 0 else old[first - 1]
        label = f"{what}, " if what else ""
        for i in range(first, n):
            hidden = blocks.run_block(self.work, i, hidden, self._captured.calls[i])
            new[i] = hidden
            if progress:
                progress(i - first + 1, n - first, f"{label}block {i + 1}/{n}")
        losses = []
        with torch.no_grad(), blocks.with_final_hidden(self.work, hidden) as state:
            for b, x in enumerate(self._batches):
                state.batch = b
                losses.append(ev.window_nll(self.work, x))
        self.records = new
        return math.exp(float(torch.cat(losses).mean()))
