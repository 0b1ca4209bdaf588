"""Live previews for an edited plan: one module's error, and an incremental perplexity.

`module_error` gives a module's relative weight error under a setting: from the
spectrum for low rank (Eckart-Young: sqrt of the tail energy), else from one
compression of that matrix. `Previewer` keeps a working copy of the model and, for
each preview, swaps in only the modules whose settings changed since the last one
(each distinct (module, setting) is compressed once and kept), then scores the
evaluation tokens. It also records every block's output for those tokens: blocks
before the first changed one replay their recorded outputs instead of running, so
one changed module in block b costs the blocks from b on, the final norm and the
head. The perplexity is the `spectra eval` convention on the first `tokens` of the
evaluation part (same windows, same batches), so `spectra eval OUT --max-tokens N`
of the applied plan reproduces it.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from compressors.activations import decoder_layers
from compressors.apply import (
    _set_module,
    compact_modules,
    factorize,
    linear_targets,
    needs_data,
)
from compressors.base import relative_error
from compressors.registry import compress, make_config
from spectra.data import perplexity as ev
from spectra.errors import SpectraInputError
from spectra.linalg.metrics import rank_error_curve
from spectra.plan.format import Plan, resolve, weight_ranks


def module_error(weight: np.ndarray | torch.Tensor | None, config, sigma=None) -> float:
    """Relative Frobenius error ||W - W_hat|| / ||W|| of `config` on one (out, in) weight.

    For a plain low-rank setting the singular values `sigma` suffice (weight may be None).
    """

    if config is None:
        return 0.0
    if config.method == "lowrank" and config.rank is not None and not config.whiten:
        if sigma is None:
            sigma = torch.linalg.svdvals(torch.as_tensor(weight).double()).numpy()
        curve = rank_error_curve(np.asarray(sigma))
        return float(curve[min(config.rank, len(curve) - 1)])
    w = torch.as_tensor(weight).float()
    if config.method == "joint":  # alone, a joint setting is its member's own rank-k SVD
        config = make_config("lowrank", rank=min(config.rank, *w.shape))

    if needs_data(config):
        raise SpectraInputError(
            f"{config.method}: needs calibration data; its error shows after `spectra apply`"
        )
    return float(relative_error(w, compress(w, config).to_dense()))


def _joint(config) -> bool:
    return config is not None and config.method == "joint"


@dataclass
class PreviewResult:
    ppl: float
    dense_ppl: float
    tokens: int
    changed: list[str]
    recompressed: int
    first_block: int | None  # first block that ran; None when nothing changed
    seconds: float


class _Replay(nn.Module):
    """Stands in for a block: returns its recorded outputs in call order."""

    def __init__(self, outputs):
        super().__init__()
        self.outputs, self.calls = outputs, 0

    def forward(self, *args, **kwargs):
        out = self.outputs[self.calls]
        self.calls += 1
        return out


class Previewer:
    """Incremental perplexity previews of per-module settings on one model."""

    def __init__(self, model, tokenizer, corpus: str = "builtin", seqlen: int = 512, built=None):
        """`built`: a store of compressed modules to share (e.g. between app sessions)."""

        self.work = copy.deepcopy(model).eval()  # the caller's model is never touched
        self.targets = linear_targets(self.work)  # name -> (Target, dense module)
        self.rank_of = weight_ranks(self.targets)  # energy settings: the weight's own spectrum
        self.layers = decoder_layers(self.work)
        self.ids = ev.token_stream(tokenizer, corpus, "eval")
        self.seqlen = seqlen
        self.current: dict[str, object] = {}  # name -> installed config
        self.built: dict[tuple, list[nn.Module]] = {} if built is None else built
        self.records: dict[int, list] | None = None  # tokens -> per-block outputs
        self.tokens: int | None = None
        self.dense_ppl: dict[int, float] = {}
        self.history: list[PreviewResult] = []

    def _install(self, layers: dict[str, object], progress=None) -> tuple[list[str], int]:
        """Swap in the modules whose setting changed; returns (changed names, compressions).

        `layers` is resolved like any plan (unknown modules and impossible settings are
        errors; joint members form their parent's group, as `spectra apply` builds it).
        """

        resolved = resolve(Plan(layers=layers), [t for t, _ in self.targets.values()], self.rank_of)
        entries = {e.name: e for e in resolved}
        changed = [n for n in self.targets if self.current.get(n) != layers.get(n)]
        bad = [n for n in changed if layers.get(n) is not None and needs_data(layers[n])]
        if bad:
            raise SpectraInputError(
                f"{bad[0]}: {layers[bad[0]].method} needs calibration data; the preview "
                "covers data-free settings (run `spectra apply` for this one)"
            )
        # a module leaving a joint group changes the group's shared V: rebuild its rest
        left = {n.rsplit(".", 1)[0] for n in changed if _joint(self.current.get(n))}
        regroup = [
            n
            for n in self.targets
            if n not in changed and _joint(self.current.get(n)) and n.rsplit(".", 1)[0] in left
        ]
        units: dict[tuple[str, ...], None] = {}  # a changed module, or its whole joint group
        for n in changed + regroup:
            e = entries[n]
            if e.group is None:
                units[(n,)] = None
            else:
                group = (e.source, e.group)
                units[tuple(x.name for x in entries.values() if (x.source, x.group) == group)] = (
                    None
                )
        compressions = 0
        for i, names in enumerate(units):
            if progress:
                progress(i, len(units), f"compressing {names[0]}")
            config = entries[names[0]].config
            if config is None:
                _set_module(self.work, names[0], self.targets[names[0]][1])
                self.current.pop(names[0], None)
                continue
            key = (names, config)
            if key not in self.built:
                dense = [self.targets[n][1] for n in names]
                weights = [self.targets[n][0].weight(d) for n, d in zip(names, dense, strict=True)]
                self.built[key] = compact_modules(factorize(config, weights), config, dense)
                compressions += 1
            for n, module in zip(names, self.built[key], strict=True):
                _set_module(self.work, n, module)
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
        blocks_before = {self.targets[n][0].block for n in changed}
        if self.tokens != tokens:
            self.records = None
        first = None
        if changed or self.records is None:
            known = [b for b in blocks_before if b is not None]
            first = 0 if self.records is None or len(known) < len(blocks_before) else min(known)
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
        """`spectra eval`'s perplexity, replaying blocks before `first` and recording the rest.

        Until it completes, no records are kept: an interrupted score leaves the next
        preview to start from block 0.
        """
        import math

        device = next(self.work.parameters()).device
        saved = list(self.layers)
        old, self.records = self.records or {}, None
        new: dict[int, list] = {i: [] for i in range(len(saved))}
        for i in range(first):
            new[i] = old[i]
            self.layers[i] = _Replay(old[i])
        total = -(-batches.shape[0] // batch_size) * (len(saved) - first)
        label = f"{what}, " if what else ""
        done = [0]

        def record(i, out):
            new[i].append(out)
            done[0] += 1
            if progress:
                progress(done[0], total, f"{label}block {i + 1}/{len(saved)}")

        hooks = [
            self.layers[i].register_forward_hook(lambda mod, args, out, i=i: record(i, out))
            for i in range(first, len(saved))
        ]
        losses = []
        try:
            with torch.no_grad():
                for lo in range(0, batches.shape[0], batch_size):
                    x = batches[lo : lo + batch_size].to(device)
                    losses.append(ev.window_nll(self.work, x))
        finally:
            for h in hooks:
                h.remove()
            for i, layer in enumerate(saved):
                self.layers[i] = layer
        self.records = new
        return math.exp(float(torch.cat(losses).mean()))
