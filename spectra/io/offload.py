"""Models whose weights stay on disk: a skeleton on the meta device, read on demand.

`skeleton(source, dtype, device)` builds the transformers model from its config with
every parameter on the meta device (buffers such as rotary frequencies are real) and
attaches a `DiskOffload`. `onload(module)` reads that module's parameters from the
safetensors files (plain reads into fresh tensors: no memory map stays open, so the
process's resident set holds what is materialised and nothing else), converts them
to the working dtype on the working device and installs them in every place that
shares them (a tied head is the embedding); `offload(module)` puts the meta
placeholders back, so the memory is freed. compressors.blocks drives it.
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch
from torch import nn

from spectra.errors import SpectraInputError
from spectra.io.tensors import TensorRef, read_header

TORCH_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


BAND_BYTES = 64 << 20  # a conversion reads this much of the stored tensor at a time


def read_tensor(ref: TensorRef, dtype: torch.dtype | None = None, device="cpu") -> torch.Tensor:
    """The tensor at `ref` as torch, converted to `dtype` on `device` (plain reads, no
    map). A conversion on the CPU reads a band of rows at a time into the converted
    tensor, so the stored copy is never whole beside it (an 8B model's embedding: 1 GB
    of bf16 beside 2.1 GB of float32)."""
    stored = TORCH_DTYPES[ref.dtype]
    convert = dtype is not None and dtype != stored and stored.is_floating_point
    if not convert or device != "cpu" or len(ref.shape) < 1 or not math.prod(ref.shape):
        t = torch.empty(ref.shape, dtype=stored)
        if t.numel():
            ref.read_bytes(t.view(-1).view(torch.uint8).numpy())
        return (t.to(dtype) if convert else t).to(device)
    out = torch.empty(ref.shape, dtype=dtype)
    row = math.prod(ref.shape[1:]) * (ref.nbytes // math.prod(ref.shape))  # bytes a row
    step = max(1, BAND_BYTES // max(row, 1))
    buf = torch.empty(min(step, ref.shape[0]) * row, dtype=torch.uint8)
    for r0 in range(0, ref.shape[0], step):
        r1 = min(r0 + step, ref.shape[0])
        part = buf[: (r1 - r0) * row]
        ref.read_bytes(part.numpy(), offset=r0 * row)
        out[r0:r1] = part.view(stored).view(r1 - r0, *ref.shape[1:])
    return out


class DiskOffload:
    """Materialises a skeleton's parameters from the checkpoint, module by module."""

    streamed = True

    def __init__(self, model: nn.Module, refs: dict[str, TensorRef], device: str):
        self.device = device
        self.slots: dict[int, list[tuple[nn.Module, str]]] = defaultdict(list)
        self.placeholder: dict[int, nn.Parameter] = {}
        self.key: dict[int, TensorRef] = {}
        self.group: dict[tuple[int, str], int] = {}
        # the groups each onload materialised, released by the matching offload even
        # where a module swapped in since (apply's compact modules) hides the old ones
        self.live: dict[int, list[int]] = defaultdict(list)
        for mod_name, module in model.named_modules(remove_duplicate=False):
            for attr, p in module._parameters.items():
                if p is None:
                    continue
                g = id(p)
                self.slots[g].append((module, attr))
                self.placeholder[g] = p
                self.group[(id(module), attr)] = g
                name = f"{mod_name}.{attr}" if mod_name else attr
                ref = _find(refs, name, model)
                if ref is not None:
                    self.key.setdefault(g, ref)
        missing = [
            _names(model, g)
            for g in self.slots
            if g not in self.key and self.placeholder[g].numel()
        ]
        if missing:
            raise SpectraInputError(f"the checkpoint has no tensor for {missing[0]}")

    def onload(self, module: nn.Module) -> None:
        for sub in module.modules():
            for attr, p in list(sub._parameters.items()):
                g = self.group.get((id(sub), attr))
                if g is None or p is None or not p.is_meta:
                    continue
                ref = self.key.get(g)
                t = read_tensor(ref, p.dtype, self.device) if ref else p.new_empty(p.shape)
                real = nn.Parameter(t, requires_grad=False)
                for m, a in self.slots[g]:
                    m._parameters[a] = real
                self.live[id(module)].append(g)

    def offload(self, module: nn.Module) -> None:
        for g in self.live.pop(id(module), ()):
            for m, a in self.slots[g]:
                m._parameters[a] = self.placeholder[g]
        for sub in module.modules():
            for attr, p in list(sub._parameters.items()):
                g = self.group.get((id(sub), attr))
                if g is None or p is None or p.is_meta:
                    continue
                for m, a in self.slots[g]:
                    m._parameters[a] = self.placeholder[g]


def _find(refs: dict[str, TensorRef], name: str, model: nn.Module) -> TensorRef | None:
    """The checkpoint tensor of parameter `name`, allowing for a base-model prefix that
    the checkpoint has and the model's names lack, or the other way round."""
    if name in refs:
        return refs[name]
    prefix = getattr(model, "base_model_prefix", "") or ""
    if prefix and name.startswith(prefix + "."):
        return refs.get(name[len(prefix) + 1 :])
    return refs.get(f"{prefix}.{name}") if prefix else None


def _names(model: nn.Module, group: int) -> str:
    for mod_name, module in model.named_modules(remove_duplicate=False):
        for attr, p in module._parameters.items():
            if p is not None and id(p) == group:
                return f"{mod_name}.{attr}"
    return "?"


def skeleton(root, files, dtype: torch.dtype, device: str) -> nn.Module:
    """The model at `root` with its parameters on disk (see the module docstring)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(root)
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        # outside the context, which re-creates every parameter registered within it
        model.tie_weights()  # a tied head is then the embedding's own parameter
    except (OSError, ValueError, KeyError) as e:
        raise SpectraInputError(f"{root}: cannot build the model ({e})") from e
    refs = {r.name: r for f in files for r in read_header(f)}
    for name, buf in list(model.named_buffers()):
        if name in refs:  # a persistent buffer stored in the checkpoint
            buf.copy_(read_tensor(refs[name], buf.dtype))
    for module in model.modules():
        for attr, b in module._buffers.items():
            if b is not None:
                module._buffers[attr] = b.to(device)
    model.__dict__["spectra_offload"] = DiskOffload(model, refs, device)  # blocks.ATTR
    return model.eval()
