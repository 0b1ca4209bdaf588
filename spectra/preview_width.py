"""Width settings in the live preview (spectra.preview): a decoder block narrowed by its
`width` setting, and its modules' own settings applied on the shapes width leaves, as
`spectra apply` builds it (compressors.apply's `_narrow`, then each module's method
reading the narrowed Grams), made on a copy and swapped into the working model whole."""

from __future__ import annotations

import copy

import torch
from torch import nn

from compressors import width_model
from compressors.apply import compact_modules, factorize, set_module
from compressors.base import Calibration
from compressors.blocks import decoder_layers
from compressors.registry import METHODS, needs_data
from spectra.errors import SpectraInputError


def split(layers: dict, prefix: str) -> tuple[dict, dict[int, object]]:
    """({module: config} of `layers`, {block index: width config}): the entries that
    name a decoder block (`model.layers.3`, `prefix` being `model.layers`) apart."""
    modules, widths = {}, {}
    for name, config in layers.items():
        rest = name[len(prefix) + 1 :] if name.startswith(prefix + ".") else ""
        if rest.isdigit() and getattr(config, "method", None) == "width":
            widths[int(rest)] = config
        elif rest.isdigit() and config is None:
            continue  # a block left whole
        else:
            modules[name] = config
    return modules, widths


def build(work: nn.Module, original: nn.Module, index: int, width, entries: dict,
          dense: dict[str, nn.Module], grams: dict | None) -> nn.Module:  # fmt: skip
    """Block `index` of `work` narrowed by `width` from its dense modules (`dense`:
    {name: dense module}; `original`: the block as it sits in `work`), then the module
    settings `entries` ({name: config}) applied to what width left (a removed
    sublayer's are dropped). `grams`: the block's {name: (H, rows)} or None. `work` is
    left as it was; returns the new block."""
    layers = decoder_layers(work)
    clone = copy.deepcopy(original)
    layers[index] = clone
    try:
        for name, module in dense.items():
            set_module(work, name, copy.deepcopy(module))
        info = width_model.shrink_block(work, index, width, grams or {})
        narrowed = width_model.narrowed_grams(work, index, info, grams) or {}
        for name, config in entries.items():
            if config is None:
                continue
            if METHODS[config.method].grouped:
                raise SpectraInputError(
                    f"{name}: {config.method} on a block narrowed by width is not previewed "
                    "(spectra apply builds it)"
                )
            try:
                module = work.get_submodule(name)
            except AttributeError:  # in a sublayer width removed
                continue
            calib = None
            if needs_data(config):
                if name not in narrowed:
                    raise SpectraInputError(f"{name}: {config.method} needs a calibration")
                h, rows = narrowed[name]
                calib = Calibration(h.to(torch.float64), rows)
            f = factorize(config, [module.weight.detach()], calib)
            set_module(work, name, compact_modules(f, config, [module])[0])
    finally:
        layers[index] = original
    return clone


class WidthBlocks:
    """spectra.preview.Previewer's blocks narrowed by width: which to build, swap in and
    swap back (`block_current`: {block: key installed}; `_originals`: the blocks they
    replaced)."""

    def _index(self, block_name: str) -> int:
        return int(block_name[len(self._prefix) + 1 :])

    def _width_key(self, index: int, width, modules: dict) -> tuple:
        """What a narrowed block is built from: its width setting, its modules'
        settings and (when any reads data) the calibration."""
        prefix = f"{self._prefix}.{index}."
        mine = tuple(sorted((n, c) for n, c in modules.items() if n.startswith(prefix)))
        aware = needs_data(width) or any(needs_data(c) for _, c in mine if c is not None)
        return ("width", index, width, mine, self._calibration_tag() if aware else None)

    def _width_changes(self, layers: dict, current: dict | None = None) -> list[tuple]:
        """[(block, key of the narrowed block wanted, or None for the original)] for the
        blocks whose installed form differs from `layers`' (`current`: what is taken as
        installed)."""
        current = self.block_current if current is None else current
        modules, widths = split(layers, self._prefix)
        if widths and self.streamed:
            raise SpectraInputError(
                "width previews need the model in memory (--offload none); spectra apply "
                "and spectra eval OUT measure it streamed"
            )
        out = []
        for i in sorted(set(widths) | set(current)):
            if not 0 <= i < len(self.layers):
                raise SpectraInputError(
                    f"{self._prefix}.{i}: the model has {len(self.layers)} blocks"
                )
            want = self._width_key(i, widths[i], modules) if i in widths else None
            if current.get(i) != want:
                out.append((i, want))
        return out

    def _install_widths(self, layers: dict, progress=None) -> int:
        """Swap in the narrowed blocks `layers` asks for (built once per key), the
        originals back where it asks for none; returns the number built."""
        built = 0
        for i, key in self._width_changes(layers):
            original = self._originals.get(i, self.layers[i])
            if key is None:
                self.layers[i] = self._originals.pop(i)
                self.block_current.pop(i)
                continue
            if key not in self.built:
                if progress:
                    progress(0, 1, f"narrowing {self._prefix}.{i}")
                prefix = f"{self._prefix}.{i}."
                dense = {n: m for n, (_, m) in self.targets.items() if n.startswith(prefix)}
                grams = None if self.grams is None or i not in self.grams else self.grams[i]
                entries = dict(key[3])
                self.built[key] = build(self.work, original, i, key[2], entries, dense, grams)
                built += 1
            self._originals[i] = original
            self.layers[i] = self.built[key]
            self.block_current[i] = key
        return built
