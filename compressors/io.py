"""Compressed checkpoints on disk: write atomically, reload into the same model.

OUT/ holds config.json and the tokenizer of the source model; dense.safetensors with
every parameter that was not compressed; factors.safetensors with every
factorization's tensors (a streamed model's are written block by block: dense-NNNNN
and factors-NNNNN per block, dense-outerNN and factors-outerNN per module outside the
blocks, as the manifest's `shards` lists); manifest.json describing each factorization
(its class and scalar fields, generically from its dataclass fields: no pickle, no
per-method code; a class is rebuilt only when a registered method declares it, or
it lives in compressors/), and which member of it each module of a group is
(compressors.base.units); plan.yaml and report.json. `--dense` adds OUT/dense/, an ordinary
Hugging Face checkpoint with the reconstructed weights.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from compressors.base import units
from compressors.targets import is_conv1d
from spectra.errors import SpectraInputError
from spectra.io.cache import atomic_dir
from spectra.io.tensors import read_header

FORMAT = 1
# the factorization classes of the registered methods by module.qualname (kept by
# compressors.registry): a method defined outside compressors/ is rebuilt through it
CLASSES: dict[str, type] = {}


def flatten(obj, prefix: str, tensors: dict) -> dict:
    """A JSON description of a factorization; its tensors go into `tensors` by key."""
    if isinstance(obj, torch.Tensor):
        key = prefix
        tensors[key] = obj.detach().contiguous()
        return {"tensor": key}
    if dataclasses.is_dataclass(obj):
        cls = type(obj)
        return {
            "class": f"{cls.__module__}.{cls.__qualname__}",
            "fields": {
                f.name: flatten(getattr(obj, f.name), f"{prefix}.{f.name}", tensors)
                for f in dataclasses.fields(obj)
            },
        }
    if isinstance(obj, list | tuple):
        return {"list": [flatten(x, f"{prefix}.{i}", tensors) for i, x in enumerate(obj)]}
    if obj is None or isinstance(obj, bool | int | float | str):
        return {"value": obj}
    raise TypeError(f"cannot serialise {type(obj).__name__} at {prefix}")


def to_device(f, device):
    """Factorization `f` with every tensor on `device` (itself when they already are)."""
    tensors: dict = {}
    desc = flatten(f, "f", tensors)
    device = torch.device(device)
    if all(t.device == device for t in tensors.values()):
        return f
    return unflatten(desc, {k: t.to(device) for k, t in tensors.items()})


def unflatten(desc: dict, tensors: dict):
    if "tensor" in desc:
        return tensors[desc["tensor"]]
    if "class" in desc:
        cls = _class(desc["class"])
        return cls(**{k: unflatten(v, tensors) for k, v in desc["fields"].items()})
    if "list" in desc:
        return [unflatten(x, tensors) for x in desc["list"]]
    return desc["value"]


def _class(qualified: str) -> type:
    """A class the manifest names: a registered method's factorization (CLASSES), or one
    of compressors/ (the parts they hold); anything else is refused."""
    cls = CLASSES.get(qualified)
    if cls is not None:
        return cls
    module, _, name = qualified.rpartition(".")
    if not module.startswith("compressors."):
        raise SpectraInputError(f"manifest names a foreign class {qualified!r}")
    return getattr(importlib.import_module(module), name)


def save(
    out: Path,
    model,
    factorizations: dict,
    plan_text: str,
    report: dict,
    tokenizer=None,
    dense: bool = False,
    force: bool = False,
) -> None:
    """Write OUT through a temporary sibling directory renamed at the end."""
    with atomic_dir(out, force) as tmp:
        writer = Writer(tmp)
        writer.part(model, factorizations)
        writer.finish(model, plan_text, report, tokenizer)
        if dense:
            _write_dense(tmp / "dense", model, factorizations, tokenizer)


class Writer:
    """OUT's tensors written part by part: the whole model at once (`save`), or block by
    block while a streamed model is compressed (a part per block, then the modules
    outside the blocks); the manifest lists the parts."""

    def __init__(self, tmp: Path):
        self.tmp = Path(tmp)
        self.modules: dict = {}
        self.shards: dict[str, list[str]] = {"dense": [], "factors": []}
        self.outer, self.written = 0, set()  # a streamed model's parts outside the blocks

    def part(self, model, factorizations: dict, block: int | None = None, prefix: str = ""):
        """Write the parameters of `model` under `prefix` (all when "") or, with `block`
        None and a prefix, those outside it; compressed modules as factors."""
        suffix = "" if block is None else f"-{block:05d}"
        if block is None and prefix:  # the modules outside the blocks that are materialised
            self.outer += 1  # (a streamed model's: one at a time) and not yet written
            suffix = f"-outer{self.outer:02d}"
            items = [
                (k, v)
                for k, v in model.state_dict().items()
                if not k.startswith(prefix + ".") and not v.is_meta and k not in self.written
            ]
            self.written.update(k for k, _ in items)
        elif prefix:
            items = list(model.get_submodule(prefix).state_dict(prefix=prefix + ".").items())
        else:
            items = list(model.state_dict().items())
        compressed = set(factorizations)
        keep, seen = {}, {}
        canonical = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
        for k, v in items:
            owner = k.rsplit(".", 1)[0]
            if any(owner == c or owner.startswith(c + ".") for c in compressed):
                continue
            # tied weights are stored once (by their first name, also across parts)
            if v.data_ptr() in seen or k not in canonical:
                continue
            seen[v.data_ptr()] = k
            keep[k] = v.detach().contiguous()
        self._save(keep, "dense", suffix)
        # a group's members are in one part: its first member holds the factorization
        tensors = {}
        for names, f in units(factorizations):
            desc = flatten(f, f"{names[0]}#f", tensors)
            for i, name in enumerate(names):
                bias = model.get_submodule(name).bias
                if bias is not None:
                    tensors[f"{name}#bias"] = bias.detach().contiguous()
                self.modules[name] = {
                    "factorization": desc if i == 0 else None,
                    "shared_with": None if i == 0 else names[0],
                    "bias": bias is not None,
                }
                if f.members > 1:
                    self.modules[name]["member"] = i
        self._save(tensors, "factors", suffix)

    def _save(self, tensors: dict, kind: str, suffix: str) -> None:
        if not tensors and suffix:
            return
        name = f"{kind}{suffix}.safetensors"
        save_file(tensors, self.tmp / name)
        self.shards[kind].append(name)

    def finish(self, model, plan_text: str, report: dict, tokenizer=None) -> None:
        manifest = {"format": FORMAT, "modules": self.modules, "shards": self.shards}
        shapes = structure(model)
        if shapes is not None:  # width: blocks narrower than the config says
            manifest["blocks"] = shapes
        (self.tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
        model.config.to_json_file(self.tmp / "config.json")
        (self.tmp / "plan.yaml").write_text(plan_text)
        (self.tmp / "report.json").write_text(json.dumps(report, indent=1))
        if tokenizer is not None:
            tokenizer.save_pretrained(self.tmp)


def structure(model):
    """The blocks' widths when width narrowed any (compressors.width_model.structure)."""
    from compressors import width_model

    try:
        return width_model.structure(model)
    except (AttributeError, SpectraInputError):  # not a Llama-like decoder: not narrowed
        return None


def skeleton(config, blocks: list | None, meta: bool = False):
    """The model of `config`, its blocks given the widths OUT's manifest recorded
    (`blocks`; None: as the config says); on the meta device when `meta`."""
    from transformers import AutoModelForCausalLM

    if meta:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    else:
        model = AutoModelForCausalLM.from_config(config)
    if blocks:
        from compressors import width_model

        width_model.restructure(model, blocks)
    return model


def _write_dense(path: Path, model, factorizations, tokenizer):
    """An ordinary checkpoint: the architecture from its config, weights reconstructed."""
    path.mkdir()
    reconstruct(model, factorizations).save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)


def reconstruct(model, factorizations: dict, keep: dict | None = None, dtype=None):
    """A plain transformers model of `model`'s architecture with every compressed
    module's weight reconstructed (`keep`: the uncompressed tensors, read from `model`
    when not given), in `dtype` (default: `model`'s)."""
    if keep is None:
        keep = {
            k: v.detach()
            for k, v in model.state_dict().items()
            if not any(k.startswith(c + ".") for c in factorizations)
        }
    dense = skeleton(model.config, structure(model))
    dense.load_state_dict(keep, strict=False)
    member = {n: i for names, _ in units(factorizations) for i, n in enumerate(names)}
    for name, f in factorizations.items():
        w = f.member_dense(member[name])
        target = dense.get_submodule(name)
        w = w.T if is_conv1d(target) else w  # GPT-2 stores (in, out)
        target.weight.data = w.detach().to(target.weight.dtype).contiguous()
        bias = model.get_submodule(name).bias
        if bias is not None:
            target.bias.data = bias.detach().clone()
    dense.tie_weights()
    if dtype is not None:
        dense = dense.to(dtype)
    return dense.eval()


def is_compressed_checkpoint(path) -> bool:
    """Whether `path` is an apply output: it has a manifest.json. A corrupt manifest,
    or a part it lists that is missing or truncated, is then an input error of `index`
    and `load` that names it."""
    return (Path(path) / "manifest.json").is_file()


def check_parts(out: Path) -> dict:
    """Every part OUT's manifest lists, checked by its header (nothing loaded): the
    {"factors"|"dense": {tensor name: TensorRef}}; a missing or truncated part is an
    input error naming it."""
    return _headers(Path(out), shard_files(Path(out)))


def _headers(out: Path, shards: dict) -> dict:
    """{"factors"|"dense": {tensor name: TensorRef}} of the listed parts; a part that is
    missing or truncated is an input error naming it."""
    refs: dict = {"factors": {}, "dense": {}}
    for kind, parts in shards.items():
        for part in parts:
            if not (out / part).is_file():
                raise SpectraInputError(f"{out}: corrupt compressed checkpoint: {part} is missing")
            try:
                refs[kind].update((r.name, r) for r in read_header(out / part))
            except SpectraInputError as e:
                raise SpectraInputError(f"{out}: corrupt compressed checkpoint: {e}") from e
    return refs


def shard_files(out: Path) -> dict[str, list[str]]:
    """The tensor files of an apply output, by kind.

    Args:
        out: the OUT directory of `spectra apply` (or of `save`).

    Returns:
        {"factors": [...], "dense": [...]}: file names inside `out`, as its manifest lists
        them (several of each when it was written block by block), else the single
        `factors.safetensors` and `dense.safetensors`.
    """
    try:
        listed = json.loads((out / "manifest.json").read_text()).get("shards")
    except (OSError, ValueError, AttributeError):
        listed = None
    if isinstance(listed, dict) and all(
        isinstance(listed.get(k), list) for k in ("factors", "dense")
    ):
        return {k: [str(p) for p in listed[k] if "/" not in str(p)] for k in ("factors", "dense")}
    return {"factors": ["factors.safetensors"], "dense": ["dense.safetensors"]}


def index(out: Path):
    """(manifest, {"factors"|"dense": {tensor name: TensorRef}}, config) of OUT, read
    without loading a tensor: what a streamed load or export walks part by part. A
    truncated or garbage part is an input error naming OUT."""
    from transformers import AutoConfig

    out = Path(out)
    refs = _headers(out, shard_files(out))
    try:
        manifest = json.loads((out / "manifest.json").read_text())
        if not isinstance(manifest.get("modules"), dict):
            raise KeyError("modules")
        config = AutoConfig.from_pretrained(out)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SpectraInputError(f"{out}: corrupt compressed checkpoint ({e})") from e
    if manifest.get("format") != FORMAT:
        raise SpectraInputError(f"{out}: unknown checkpoint format {manifest.get('format')!r}")
    return manifest, refs, config


def load(out, device: str = "cpu"):
    """(model, factorizations) rebuilt from OUT; corrupt files are input errors."""
    from transformers import AutoConfig

    out = Path(out)
    shards = shard_files(out)
    _headers(out, shards)  # a missing or truncated part is named as such
    try:
        manifest = json.loads((out / "manifest.json").read_text())
        # factors straight onto the device: the modules built from them share them, and
        # healing trains them in place
        tensors, dense = {}, {}
        for part in shards["factors"]:
            tensors.update(load_file(out / part, device=str(torch.device(device))))
        for part in shards["dense"]:
            dense.update(load_file(out / part))
        config = AutoConfig.from_pretrained(out)
    except Exception as e:  # truncated, garbage or missing parts
        raise SpectraInputError(
            f"{out}: corrupt compressed checkpoint ({e.__class__.__name__})"
        ) from e
    if manifest.get("format") != FORMAT:
        raise SpectraInputError(f"{out}: unknown checkpoint format {manifest.get('format')!r}")
    try:
        model = skeleton(config, manifest.get("blocks"))
    except (ValueError, TypeError, KeyError) as e:
        raise SpectraInputError(f"{out}: corrupt compressed checkpoint (blocks: {e})") from e
    try:
        factorizations = {}
        for name, spec in manifest["modules"].items():
            if spec["factorization"] is not None:
                factorizations[name] = unflatten(spec["factorization"], tensors)
        for name, spec in manifest["modules"].items():
            if spec["factorization"] is None:
                factorizations[name] = factorizations[spec["shared_with"]]
        shared = {}
        for name, spec in manifest["modules"].items():
            f = factorizations[name]
            bias = tensors.get(f"{name}#bias")
            if f.members > 1:  # a group's members, built together
                group = spec["shared_with"] or name
                if group not in shared:
                    shared[group] = f.member_modules([None] * f.members)
                module = shared[group][spec["member"]]
                if bias is not None:
                    module.bias = torch.nn.Parameter(bias, requires_grad=False)
            else:
                module = f.as_module(bias)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, module)
        missing, unexpected = model.load_state_dict(dense, strict=False)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise SpectraInputError(
            f"{out}: corrupt compressed checkpoint ({e.__class__.__name__}: {e})"
        ) from e
    if unexpected:
        raise SpectraInputError(
            f"{out}: corrupt compressed checkpoint (unexpected {unexpected[0]})"
        )
    model.tie_weights()
    return model.to(device).eval(), factorizations
