"""A compressed OUT run a block at a time, as `compressors.io.load` would build it whole.

`load(out, device, dtype)` builds the architecture from OUT's config on the meta
device, each compressed module replaced by a parameterless `Pending` placeholder, and
attaches `OutOffload`: materialising a block (compressors.blocks.onloaded) reads its
dense parameters from OUT's dense shards (spectra.io.offload.DiskOffload) and puts in
place each compressed module inside it, built from its factorization (read from the
factors shards for the purpose) as `io.load` builds it; releasing the block puts the
placeholders back. A compressed module outside the blocks (a head) is built once and
kept resident for the run (its factors are what it costs).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from torch import nn


class Lazy(Mapping):
    """Tensors by name, each read from its shard when asked for."""

    def __init__(self, refs: dict):
        self.refs = refs

    def __getitem__(self, key):
        from spectra.io.offload import read_tensor

        return read_tensor(self.refs[key])

    def __iter__(self):
        return iter(self.refs)

    def __len__(self):
        return len(self.refs)


class Pending(nn.Module):
    """Where a compressed module goes while its block is on disk."""

    def __init__(self, name: str):
        super().__init__()
        self.name = name


class OutOffload:
    """DiskOffload for the dense parameters, factors built into modules on demand."""

    streamed = True

    def __init__(self, model, disk, factor_refs: dict, modules: dict, device: str, dtype):
        self.disk, self.refs, self.modules = disk, factor_refs, modules
        self.device, self.dtype = device, dtype
        self.placed: dict[int, list] = {}

    def onload(self, module: nn.Module) -> None:
        self.disk.onload(module)
        placed, groups = [], {}
        for rel, sub in list(module.named_modules()):
            if isinstance(sub, Pending):
                built = self._build(sub.name, groups).to(self.device)
                built = built.to(self.dtype) if self.dtype is not None else built
                parent, _, child = rel.rpartition(".")
                owner = module.get_submodule(parent) if parent else module
                setattr(owner, child, built)
                placed.append((owner, child, sub))
        self.placed[id(module)] = placed

    def offload(self, module: nn.Module) -> None:
        for owner, child, pending in self.placed.pop(id(module), []):
            setattr(owner, child, pending)
        self.disk.offload(module)

    def _build(self, name: str, groups: dict) -> nn.Module:
        from compressors import io

        spec = self.modules[name]
        first = spec["shared_with"] or name
        f = io.unflatten(self.modules[first]["factorization"], Lazy(self.refs))
        bias = self.refs.get(f"{name}#bias")
        bias = None if bias is None else Lazy(self.refs)[f"{name}#bias"]
        if f.members == 1:
            return f.as_module(bias)
        if first not in groups:  # the factorization's members, built together
            groups[first] = f.member_modules([None] * f.members)
        module = groups[first][spec["member"]]
        if bias is not None:
            module.bias = nn.Parameter(bias, requires_grad=False)
        return module


def load(out, device: str = "cpu", dtype=None) -> nn.Module:
    """OUT as a skeleton run a block at a time (see the module docstring)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from compressors import blocks, io
    from spectra.io.offload import DiskOffload, read_tensor

    out = Path(out)
    manifest, refs, config = io.index(out)
    modules = manifest["modules"]
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, **({"dtype": dtype} if dtype else {}))
    if manifest.get("blocks"):  # width narrowed them
        from compressors import width_model

        width_model.restructure(model, manifest["blocks"])
    model.tie_weights()
    inside = {id(m) for m in blocks.decoder_layers(model).modules()}
    outer = [n for n in modules if id(model.get_submodule(n)) not in inside]
    for name in modules:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, Pending(name))
    for name, buf in list(model.named_buffers()):
        if name in refs["dense"]:  # a persistent buffer stored in OUT
            buf.copy_(read_tensor(refs["dense"][name], buf.dtype))
    for module in model.modules():
        for attr, b in module._buffers.items():
            if b is not None:
                module._buffers[attr] = b.to(device)
    disk = DiskOffload(model, refs["dense"], device)
    off = OutOffload(model, disk, refs["factors"], modules, device, dtype)
    for name in outer:  # compressed outside the blocks (a head): built once, kept resident
        built = off._build(name, {}).to(device)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, built.to(dtype) if dtype else built)
    model.__dict__[blocks.ATTR] = off
    return model.eval()
