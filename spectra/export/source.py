"""What an export reads: the dense reconstruction of an apply OUT, tensor by tensor.

Two sources give the same tensors, those of `compressors.io.reconstruct` (state-dict
names, tied weights once, in the reconstruction's own dtype; a compressed module's
bias as stored):

- `Resident(model, factorizations)`: the OUT loaded whole (`compressors.io.load`) and
  reconstructed once; one part.
- `Streamed(out)`: nothing loaded. The architecture is a skeleton on the meta device
  built from OUT's config; every tensor of every shard of OUT is indexed, not read.
  `value(name)` reads one dense tensor, or one compressed module's factorization (then
  dropped) to rebuild its weight. `parts()` groups the names by block, each module
  outside the blocks on its own, so an export that writes a part at a time holds
  about one block, however OUT was written.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from compressors.targets import is_conv1d
from spectra.errors import SpectraInputError


def cast(t: torch.Tensor, dtype) -> torch.Tensor:
    """`t` in `dtype` when it is floating point (as `Module.to(dtype)` converts)."""
    return t.to(dtype) if dtype is not None and t.is_floating_point() else t


def _distinct(model) -> list[str]:
    """State-dict names, a tensor shared under several names (tied) under its first."""
    seen, names = set(), []
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) not in seen:
            seen.add(id(t))
            names.append(name)
    return names


class Resident:
    """The reconstruction of a loaded OUT, held whole."""

    streamed = False

    def __init__(self, model, factorizations: dict):
        from compressors import io, width_model

        # width: skipped blocks out, one width into the config, or the blocks' widths
        # for a per-block export (None: the architecture as it was)
        self.blocks = None
        if io.structure(model) is not None:
            factorizations, self.blocks = width_model.exported(model, factorizations)
        self.factorizations = factorizations
        self.dense = io.reconstruct(model, factorizations)
        self.config = self.dense.config
        self.state = self.dense.state_dict()
        self.names = [n for n in _distinct(self.dense)]
        self.dtype = self.dense.dtype

    def parts(self) -> list[list[str]]:
        return [self.names]

    def value(self, name: str) -> torch.Tensor:
        return self.state[name]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.state[name].shape)

    def module(self, name: str):
        return self.dense.get_submodule(name)

    def factorization(self, name: str):
        return self.factorizations[name]

    def compressed(self) -> list[str]:
        return list(self.factorizations)

    def member(self, name: str) -> int:
        """Which member of its factorization's group `name` is (0 alone)."""
        from compressors.base import units

        if not hasattr(self, "_members"):
            self._members = {
                n: i for names, _ in units(self.factorizations) for i, n in enumerate(names)
            }
        return self._members[name]

    def grid(self, name: str) -> tuple[int, int, bool] | None:
        """(bits, group size, symmetric) of a module stored as a scalar grid, else None."""
        from compressors.quant import grid_of

        return grid_of(self.factorizations[name])


class Streamed:
    """The reconstruction of OUT read from its files a tensor at a time."""

    streamed = True

    def __init__(self, out):
        from accelerate import init_empty_weights
        from transformers import AutoModelForCausalLM

        from compressors import blocks, io

        self.out = out = Path(out)
        manifest, self.refs, self.config = io.index(out)
        self.modules = manifest["modules"]
        with init_empty_weights(include_buffers=False):
            self.dense = AutoModelForCausalLM.from_config(self.config)
        # width: skipped blocks out (the rest renumbered: `_old` names them in OUT), one
        # width into the config, or the blocks' widths for a per-block export
        self.blocks, self._renamed = None, None
        if manifest.get("blocks"):
            from compressors import width_model

            recorded = manifest["blocks"]
            width_model.restructure(self.dense, recorded)
            prefix = blocks.layers_name(self.dense)
            _, self.blocks = width_model.exported(self.dense, {})
            kept = [i for i, b in enumerate(recorded) if b["ffn"] or b["kv_heads"]]
            if len(kept) < len(recorded):
                self._renamed = (re.compile(rf"^{re.escape(prefix)}\.(\d+)\."), prefix, kept)
                self.modules = self._renumbered(manifest["modules"])
        self.dense.tie_weights()  # outside the context, as compressors.blocks' skeleton
        self.config = self.dense.config
        self.names = _distinct(self.dense)
        self.shapes = {n: tuple(t.shape) for n, t in self.dense.state_dict().items()}
        self.dtype = self.dense.dtype
        layers = blocks.decoder_layers(self.dense)
        self.prefix = next(n for n, m in self.dense.named_modules() if m is layers)

    def _old(self, name: str) -> str:
        """`name` (of the export) as OUT's files name it."""
        if self._renamed is None:
            return name
        pattern, prefix, kept = self._renamed
        return pattern.sub(lambda m: f"{prefix}.{kept[int(m.group(1))]}.", name, count=1)

    def _renumbered(self, modules: dict) -> dict:
        """The manifest's modules by their export names (those of dropped blocks out)."""
        pattern, prefix, kept = self._renamed
        new = {}
        for name in modules:
            m = pattern.match(name)
            if m is None:
                new[name] = name
            elif int(m.group(1)) in kept:
                new[name] = f"{prefix}.{kept.index(int(m.group(1)))}.{name[m.end() :]}"
        out = {}
        for name, spec in modules.items():
            if name in new:
                spec = dict(spec)
                if spec.get("shared_with"):
                    spec["shared_with"] = new[spec["shared_with"]]
                out[new[name]] = spec
        return out

    def parts(self) -> list[list[str]]:
        """The names by block, and by module outside the blocks, in state-dict order."""
        block = re.compile(rf"{re.escape(self.prefix)}\.(\d+)\.")
        groups: dict = {}
        for n in self.names:
            m = block.match(n)
            groups.setdefault(int(m.group(1)) if m else n.rpartition(".")[0], []).append(n)
        return list(groups.values())

    def shape(self, name: str) -> tuple[int, ...]:
        return self.shapes[name]

    def module(self, name: str):
        return self.dense.get_submodule(name)

    def compressed(self) -> list[str]:
        return list(self.modules)

    def member(self, name: str) -> int:
        """Which member of its factorization's group `name` is (0 alone)."""
        return self.modules[name].get("member", 0)

    def grid(self, name: str) -> tuple[int, int, bool] | None:
        """(bits, group size, symmetric) of a module stored as a scalar grid, else None
        (read from the manifest: no tensor is read)."""
        desc = self.modules[name]["factorization"]
        if not desc or not desc.get("class", "").endswith("quant.Quantized"):
            return None
        fields = desc["fields"]
        return tuple(fields[k]["value"] for k in ("nbits", "group_size", "symmetric"))

    def factorization(self, name: str):
        from compressors import io
        from compressors.streamed_out import Lazy

        spec = self.modules[name]
        desc = spec["factorization"] or self.modules[spec["shared_with"]]["factorization"]
        try:
            return io.unflatten(desc, Lazy(self.refs["factors"]))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise SpectraInputError(f"{self.out}: corrupt compressed checkpoint ({e})") from e

    def value(self, name: str) -> torch.Tensor:
        """One tensor of the reconstruction (what `io.reconstruct` holds under `name`)."""
        from spectra.io.offload import read_tensor

        owner, _, attr = name.rpartition(".")
        spec = self.modules.get(owner)
        if spec is None:
            ref = self.refs["dense"].get(self._old(name))
            if ref is None:
                raise SpectraInputError(f"{self.out}: corrupt compressed checkpoint (no {name})")
            return read_tensor(ref, self.dtype)
        if attr == "bias":
            return read_tensor(self.refs["factors"][f"{self._old(owner)}#bias"])
        f = self.factorization(owner)
        w = f.member_dense(spec.get("member", 0))
        w = w.T if is_conv1d(self.module(owner)) else w  # GPT-2: (in, out)
        return w.detach().to(self.dtype).contiguous()


def shard_names(parts: list, stem: str = "model") -> list[str]:
    """One file per part: `model.safetensors` alone, else Hugging Face's sharded names."""
    if len(parts) == 1:
        return [f"{stem}.safetensors"]
    return [f"{stem}-{i + 1:05d}-of-{len(parts):05d}.safetensors" for i in range(len(parts))]


def write_index(tmp: Path, weight_map: dict, total: int, stem: str = "model") -> None:
    """`model.safetensors.index.json` of a sharded checkpoint (none for one file)."""
    if len(set(weight_map.values())) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (tmp / f"{stem}.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
