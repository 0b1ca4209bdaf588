"""Run a causal LM one transformer block at a time, resident or streamed from disk.

A model's parameters are either all in memory (resident) or left on disk behind
meta-device placeholders that an offloader attached to the model materialises on
demand (`spectra.io.offload`). Every command that runs a model goes through this
module, so both cases are one code path:

- `capture(model, batches)`: one forward of the whole model per batch with every
  block stood in for, recording what each block is called with (its position
  embeddings and mask differ by layer type in Gemma 3) and the first block's input;
  only the modules outside the blocks are materialised for it.
- `run_block(model, index, hidden, calls)`: block `index` over every batch, its
  parameters materialised for the duration (`onloaded`).
- `with_final_hidden(model, finals)`: the model's own forward (embeddings, final norm,
  head, logit softcap) made to read given final hidden states, so scoring code written
  for a plain model (spectra.data.perplexity.window_nll) runs unchanged on a stream.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch import nn

from spectra.errors import SpectraInputError


class Resident:
    """The offloader of a model whose parameters are all in memory: nothing to do."""

    streamed = False

    def onload(self, module: nn.Module) -> None:
        pass

    def offload(self, module: nn.Module) -> None:
        pass


RESIDENT = Resident()
ATTR = "spectra_offload"  # the model attribute that holds its offloader


def offloader(model: nn.Module):
    """The offloader attached to `model` (RESIDENT when none is)."""
    return model.__dict__.get(ATTR, RESIDENT)


def is_streamed(model: nn.Module) -> bool:
    return offloader(model).streamed


@contextlib.contextmanager
def onloaded(model: nn.Module, *modules: nn.Module):
    """Materialise `modules`' parameters for the duration (a no-op when resident)."""
    off = offloader(model)
    done = []
    try:
        for m in modules:
            off.onload(m)
            done.append(m)
        yield
    finally:
        for m in reversed(done):
            off.offload(m)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's list of transformer blocks (`layers`, `h` or `blocks`)."""
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and name.rsplit(".", 1)[-1] in ("layers", "h", "blocks"):
            return mod
    raise SpectraInputError("cannot find the model's transformer blocks")


def layers_name(model: nn.Module) -> str:
    """The module name of the model's list of blocks (e.g. model.layers)."""
    layers = decoder_layers(model)
    return next(name for name, mod in model.named_modules() if mod is layers)


def outer_modules(model: nn.Module, head: bool = True) -> list[nn.Module]:
    """The modules outside the blocks that hold parameters of their own (embeddings,
    final norm, head; without the head when `head` is False)."""
    inside = {id(m) for m in decoder_layers(model).modules()}
    out_head = model.get_output_embeddings()
    return [
        m
        for m in model.modules()
        if id(m) not in inside
        and any(True for _ in m.parameters(recurse=False))
        and (head or m is not out_head)
    ]


class _Stop(Exception):
    pass


@contextlib.contextmanager
def _standing_in(model: nn.Module, sink):
    """Within, block i's forward is `sink(i, hidden, args, kwargs)`. The blocks stay in
    the module tree (hooks that walk it, e.g. compressed-tensors' decompression on the
    first forward, still find every module): only their `forward` is shadowed by an
    instance attribute, removed on exit."""
    layers = list(decoder_layers(model))

    def stand(index):
        def forward(hidden_states, *args, **kwargs):
            return sink(index, hidden_states, args, kwargs)

        return forward

    for i, layer in enumerate(layers):
        layer.forward = stand(i)
    try:
        yield
    finally:
        for layer in layers:
            layer.__dict__.pop("forward", None)


@dataclass
class Captured:
    """What the blocks read, per batch: the first block's input and each block's call."""

    hidden: list[torch.Tensor]  # per batch: (B, T, d) input of block 0
    calls: list[list[tuple]] = field(default_factory=list)  # [block][batch] (args, kwargs)


def capture(model: nn.Module, batches: list[torch.Tensor]) -> Captured:
    """Catch block 0's input and every block's other arguments for each batch of token
    ids, with only the modules outside the blocks (not the head) materialised."""
    n = len(decoder_layers(model))
    out = Captured([], [[] for _ in range(n)])

    def sink(index, hidden, args, kwargs):
        if index == 0:
            out.hidden.append(hidden)
        out.calls[index].append((args, kwargs))
        if index == n - 1:
            raise _Stop
        return hidden

    device = working_device(model)
    outer = outer_modules(model, head=False)
    with onloaded(model, *outer), _standing_in(model, sink), torch.no_grad():
        for x in batches:
            with contextlib.suppress(_Stop):  # no KV cache: it would grow with every call
                model(x.to(device), use_cache=False)
    return out


def call_block(layer: nn.Module, hidden: torch.Tensor, call: tuple) -> torch.Tensor:
    args, kwargs = call
    y = layer(hidden, *args, **kwargs)
    return y[0] if isinstance(y, tuple) else y


def run_block(model, index: int, hidden: list, calls: list, before=None) -> list[torch.Tensor]:
    """Block `index` of `model` over every batch (no gradients), materialised for the
    duration; `before(batch)` is called before each batch's call (collectors)."""
    layer = decoder_layers(model)[index]
    outs = []
    with onloaded(model, layer), torch.no_grad():
        for b, (h, call) in enumerate(zip(hidden, calls, strict=True)):
            if before is not None:
                before(b)
            outs.append(call_block(layer, h, call))
    return outs


class FinalHidden:
    """`with_final_hidden`'s switch: which batch's final hidden states the model reads."""

    def __init__(self, finals: list[torch.Tensor]):
        self.finals = finals
        self.batch = 0


class _Zeros(nn.Module):
    """Stands in for the input embedding when its output is thrown away: zeros of the
    embedding's width, so a streamed model need not read the embedding matrix."""

    def __init__(self, embedding: nn.Module):
        super().__init__()
        self.dim = embedding.weight.shape[1]
        self.dtype = embedding.weight.dtype

    def forward(self, ids):
        return torch.zeros(*ids.shape, self.dim, dtype=self.dtype, device=ids.device)


@contextlib.contextmanager
def with_final_hidden(model: nn.Module, finals: list[torch.Tensor]):
    """Within, `model(x)` skips its blocks and continues from `finals[state.batch]` (set
    `state.batch` before each call); the outer modules (head too) are materialised. A
    streamed model's input embedding, whose output the blocks' stand-ins discard, is
    replaced by zeros unless the head shares its matrix."""
    n = len(decoder_layers(model))
    state = FinalHidden(finals)

    def sink(index, hidden, args, kwargs):
        return state.finals[state.batch] if index == n - 1 else hidden

    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    skip = (
        is_streamed(model)
        and isinstance(embed, nn.Embedding)
        and getattr(head, "weight", None) is not embed.weight  # a compressed head shares none
    )
    outer = [m for m in outer_modules(model) if not (skip and m is embed)]
    if skip:
        model.set_input_embeddings(_Zeros(embed))
    try:
        with onloaded(model, *outer), _standing_in(model, sink):
            yield state
    finally:
        if skip:
            model.set_input_embeddings(embed)


def working_device(model: nn.Module) -> torch.device:
    """Where `model` computes: its offloader's device, else its parameters'."""
    off = offloader(model)
    if getattr(off, "device", None) is not None:
        return torch.device(off.device)
    return next(model.parameters()).device


def working_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of `model`'s floating-point parameters (the first one's)."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def hidden_through(model: nn.Module, captured: Captured, progress=None, on_block=None):
    """Final hidden states per batch: every block run in turn on the captured inputs.

    `on_block(index, inputs)` may be given to see each block's inputs before it runs
    (e.g. to collect Grams); `progress(done, total, what)` hears after each block."""
    hidden = captured.hidden
    n = len(captured.calls)
    for index in range(n):
        if on_block is not None:
            on_block(index, hidden)
        hidden = run_block(model, index, hidden, captured.calls[index])
        if progress:
            progress(index + 1, n, f"block {index}")
    return hidden
