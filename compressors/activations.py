"""What the linear modules of a model read: H = X^T X of their inputs, block by block.

GPTQ's layer-wise scheme: the inputs of the first transformer block are caught once
for all calibration windows, then block by block the (dense) block runs on them with
hooks that accumulate H = X^T X for each of its linear modules, and its outputs
become the next block's inputs. Memory: the activations of one block, that block's
Grams, and the model, or only its current block when it is streamed from disk.
Modules that read the same tensor (q, k, v; gate, up) share one product, so their
H is one tensor object. The LM head and other modules outside the blocks get none.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from compressors import blocks
from compressors.targets import linear_targets

BATCH = 4  # calibration windows per forward call
GRAM_PANELS = 4  # H in column panels: only the upper triangle's panels are multiplied


def gram(x: torch.Tensor) -> torch.Tensor:
    """x^T x (float32 products) for x (rows, n), multiplying only the panels on and above
    the diagonal and mirroring the rest (about 3/4 of the full product's work)."""
    out = x.new_zeros(x.shape[1], x.shape[1], dtype=torch.float32)
    add_gram(x, out)
    return out


def add_gram(x: torch.Tensor, acc: torch.Tensor) -> None:
    """acc += x^T x, the products in float32 a column panel at a time (as `gram`), each
    panel added into `acc` (float64 in a collector) in place: no n x n float32 beside
    the accumulator (an 8B model's down_proj: 0.8 GB)."""
    x = x.float()
    n = x.shape[1]
    if n < 256:
        acc.add_(x.T @ x)
        return
    step = math.ceil(n / GRAM_PANELS)
    for lo in range(0, n, step):
        hi = min(lo + step, n)
        band = x[:, lo:hi].T @ x[:, lo:]
        acc[lo:hi, lo:] += band
        acc[hi:, lo:hi] += band[:, hi - lo :].T


class GramCollector:
    """H = X^T X of each hooked module's input, with its row count, summed over calls.

    One product per input tensor per call: modules that read the same tensor share
    one accumulator. Inputs are keyed by object identity and held until `next_call()`,
    so a freed tensor's memory can never be reused by another input under the same
    key. Products are float32 per call (a few thousand rows), summed in `dtype`.
    """

    def __init__(self, modules: dict[str, nn.Module], dtype=torch.float64):
        self.dtype = dtype
        self.owner: dict[str, str] = {}  # module -> the module whose accumulator it reads
        self.sums: dict[str, list] = {}  # owner -> [H, rows]
        self._call: dict[int, tuple] = {}
        self._handles = [m.register_forward_pre_hook(self._hook(n)) for n, m in modules.items()]

    def _hook(self, name: str):
        def hook(module, inputs):
            x = inputs[0]
            seen = self._call.get(id(x))
            if seen is None:
                flat = x.detach().reshape(-1, x.shape[-1])
                seen = self._call[id(x)] = (x, name)
                acc = self.sums.setdefault(name, [None, 0])
                if acc[0] is None:
                    n = flat.shape[-1]
                    acc[0] = torch.zeros(n, n, dtype=self.dtype, device=flat.device)
                add_gram(flat, acc[0])  # float32 panels, summed into the wide accumulator
                acc[1] += flat.shape[0]
            if self.owner.setdefault(name, seen[1]) != seen[1]:
                raise RuntimeError(f"{name}: reads a differently shared input from call to call")

        return hook

    def next_call(self) -> None:
        self._call.clear()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()

    def grams(self) -> dict[str, tuple[torch.Tensor, int]]:
        return {n: (self.sums[o][0], self.sums[o][1]) for n, o in self.owner.items()}


def block_grams(model, calib_ids: torch.Tensor, progress=None, after_block=None):
    """Yield (block index, {module name: (H float64 on the CPU, rows)}) for every
    transformer block of `model`, from `calib_ids` (windows, seqlen) run densely, one
    block at a time (compressors.blocks: a model streamed from disk holds one block).

    `progress(done, total, what)` is called after each block. `after_block(index,
    grams)`, when given, is called with each block's Grams while the block is
    materialised, and may replace the block's modules (compress it): the next block
    then reads the outputs of the block as it is now (sequential calibration, as
    GPTQ's and SparseGPT's reference code do), at the cost of a second forward pass
    per block.
    """
    targets = linear_targets(model)
    layers = blocks.decoder_layers(model)
    batches = [calib_ids[lo : lo + BATCH] for lo in range(0, calib_ids.shape[0], BATCH)]
    captured = blocks.capture(model, batches)
    hidden = captured.hidden

    for index, layer in enumerate(layers):
        calls = captured.calls[index]
        mods = {n: m for n, (t, m) in targets.items() if t.block == index}
        with blocks.onloaded(model, layer):
            collector = GramCollector(mods)
            try:
                outs = []
                with torch.no_grad():
                    for h, call in zip(hidden, calls, strict=True):
                        collector.next_call()
                        y = blocks.call_block(layer, h, call)
                        if after_block is None:
                            outs.append(y)
            finally:
                collector.remove()
            moved: dict[int, torch.Tensor] = {}  # one CPU copy per shared matrix
            out = {}
            for name, (h, rows) in collector.grams().items():
                out[name] = (moved.setdefault(id(h), h.cpu()), rows)
            del collector, moved
            if after_block is not None:
                after_block(index, out)
                with torch.no_grad():
                    outs = [
                        blocks.call_block(layers[index], h, c)
                        for h, c in zip(hidden, calls, strict=True)
                    ]
                if progress:
                    progress(index + 1, len(layers), f"block {index}")
                yield index, out  # the block still materialised: a streamed apply writes it
        if after_block is None:
            if progress:
                progress(index + 1, len(layers), f"block {index}")
            yield index, out  # the block released: only its Grams are held
        hidden = outs


def collect(model, calib_ids: torch.Tensor, progress=None) -> dict[int, dict]:
    """All blocks' Grams in memory: {block: {name: (H, rows)}} (see block_grams)."""
    return dict(block_grams(model, calib_ids, progress))
