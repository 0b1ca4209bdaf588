"""Gradients of windows' token NLL, backpropagated one transformer block at a time.

`backward_by_block(model, windows, visitor)` runs every window forward through the
blocks with no autograd graph, keeping the states at the block boundaries; scores
them with the model's own head (spectra.data.perplexity.window_nll) with the final
states as leaves; then walks the blocks from the last to the first, materialising
each (compressors.blocks.onloaded), recomputing its forward with a graph for one
window at a time and backpropagating the gradient that reached its output. So a
model streamed from disk holds one block and its graph at a time, and a resident one
gets the same numbers through the same code. The loss of a window is its summed
token NLL, so a gradient is that of the window's sum, as the Fisher wants.

A visitor sees each scope (`None` for the modules outside the blocks, then the
blocks' indices, last first) with its parameters materialised:
`before(scope, module)` (switch gradients on, hook outputs), `tensors()` (after the
forward: what to differentiate) and `receive(window, grads)` (the gradients, None
where the loss does not read a tensor), `after(scope)` (undo `before`).
"""

from __future__ import annotations

import torch

from compressors import blocks
from spectra.data.perplexity import window_nll


def summed_nll(model, x: torch.Tensor) -> torch.Tensor:
    """The summed token NLL of the windows `x` (B, T), float64."""
    return (window_nll(model, x) * (x.shape[1] - 1)).sum()


def backward_by_block(model, windows: torch.Tensor, visitor, progress=None) -> None:
    """Each window's summed-NLL gradient handed to `visitor` (see the module docstring)."""
    device = blocks.working_device(model)
    batches = [w[None].to(device) for w in windows]  # one window each: per-window gradients
    captured = blocks.capture(model, batches)
    layers = blocks.decoder_layers(model)
    n = len(layers)
    bounds = [captured.hidden]  # bounds[k]: block k's input per window
    for k in range(n):
        bounds.append(blocks.run_block(model, k, bounds[k], captured.calls[k]))
    finals = [h.detach().requires_grad_(True) for h in bounds[n]]
    grads_out = []
    with blocks.with_final_hidden(model, finals) as state, torch.enable_grad():
        visitor.before(None, model)
        for b, x in enumerate(batches):
            state.batch = b
            loss = summed_nll(model, x)
            wanted = visitor.tensors()
            got = torch.autograd.grad(loss, [finals[b], *wanted], allow_unused=True)
            grads_out.append(got[0])
            visitor.receive(b, got[1:])
        visitor.after(None)
    bounds[n] = finals = None
    for k in reversed(range(n)):
        layer = layers[k]
        with blocks.onloaded(model, layer), torch.enable_grad():
            visitor.before(k, layer)
            for b, call in enumerate(captured.calls[k]):
                h = bounds[k][b].detach().requires_grad_(True)  # a graph even when frozen
                y = blocks.call_block(layer, h, call)
                wanted = visitor.tensors()
                got = torch.autograd.grad(y, [h, *wanted], grads_out[b], allow_unused=True)
                grads_out[b] = got[0] if k > 0 else None
                visitor.receive(b, got[1:])
                del y, h
            visitor.after(k)
        bounds[k + 1] = None
        if progress:
            progress(n - k, n, f"block {k}")


def in_scope(model, targets: dict, scope, module) -> dict:
    """The entries of `targets` ({name: (target, module)}) whose module is inside
    `module` (block `scope`) or, for scope None, outside every block."""
    if scope is None:
        inside = {id(m) for m in blocks.decoder_layers(model).modules()}
        return {n: tm for n, tm in targets.items() if id(tm[1]) not in inside}
    mine = {id(m) for m in module.modules()}
    return {n: tm for n, tm in targets.items() if id(tm[1]) in mine}
