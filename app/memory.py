"""Whether a page action fits in memory, said before it starts, with the figure.

Each heavy action of the app (a calibration, Auto-allocate, a preview, a sensitivity)
runs the model the way the command line does: resident, or streamed from disk one block
at a time. Its peak is then about the model as it is held, plus what the action keeps
beside it, from the model's headers alone:

- calibration: one block's Grams in float64 (their float32 copy is written as the next
  block runs) and the calibration windows' hidden states;
- Auto-allocate: the calibration's, or one block of Grams read in float64, plus one
  whitened factorization's scratch per core, one in all for matrices of 16.8M elements
  or more (the weight times the Gram's factor, its SVD's two factors, all float64);
- a preview: the plan's compressed modules, kept for the next previews in the working
  dtype, one hidden state per block and window for the blocks it replays, and a block of
  Grams as stored (float32) with the H being used in float64 when the plan is
  data-aware;
- a sensitivity: the hidden states of its windows.

An action whose estimate exceeds the memory available (free memory, plus the model
when it is resident already) is refused in the page with both figures.
"""

from __future__ import annotations

import os

from spectra.data.grams import SHARED_INPUT
from spectra.errors import SpectraInputError
from spectra.io.devices import free_bytes
from spectra.io.model import Model

GB = 1e9
WIDTH = {"float32": 4, "bfloat16": 2, "float16": 2}  # bytes per element


def held(model: Model) -> float:
    """Bytes the model takes as it is run (resident, or one streamed block)."""
    d = model.describe()
    return (d["resident_gb"] if d["offload"] == "none" else d["streamed_gb"]) * GB


def gram_block(model: Model) -> int:
    """Bytes of the largest block's Grams in float64 (one per input tensor)."""
    per: dict[int, dict] = {}
    for m in model.matrices:
        if m.block is not None:
            per.setdefault(m.block, {})[SHARED_INPUT.get(m.role, m.name)] = m.shape[1] ** 2 * 8
    return max((sum(v.values()) for v in per.values()), default=0)


def hidden(model: Model) -> int:
    return int(model.config.get("hidden_size") or model.config.get("n_embd") or 0)


def blocks(model: Model) -> int:
    return len({m.block for m in model.matrices if m.block is not None})


def scratch(model: Model) -> int:
    """One whitened factorization per core, or one in all for matrices of SERIAL_NUMEL
    elements or more (spectra.linalg.parallel.map_by_size): the largest block matrix
    twice in float64 (the weight and its product with a band of H or its n x n
    factor's)."""
    from spectra.linalg.parallel import SERIAL_NUMEL

    big = max((m.shape[0] * m.shape[1] for m in model.matrices if m.block is not None), default=0)
    return 2 * big * 8 * (1 if big >= SERIAL_NUMEL else min(2, os.cpu_count() or 1))


def need(model: Model, action: str, tokens: int = 0, kept_params: int = 0) -> dict[str, float]:
    """The parts of `action`'s peak, in bytes, by what they are."""
    states = tokens * hidden(model) * 4 * 2  # a block's input and output
    parts = {"the model as run": held(model)}
    if action in ("calibration", "auto-allocate"):
        parts["a block of calibration Grams (float64)"] = gram_block(model) * 1.5
        parts["the windows' hidden states"] = states
    if action == "auto-allocate":
        parts["whitened factorizations' scratch"] = scratch(model)
    if action == "preview":
        parts["the plan's compressed modules"] = kept_params * WIDTH.get(model.dtype, 4)
        parts["recorded block outputs"] = tokens * hidden(model) * 4 * blocks(model)
        widest = max((m.shape[1] for m in model.matrices if m.block is not None), default=0)
        parts["a block of calibration Grams, one H in float64"] = (
            gram_block(model) // 2 + widest**2 * 8
        )
    if action == "sensitivity":
        parts["the windows' hidden states"] = states * 2
    return parts


def check(model: Model, action: str, tokens: int = 0, kept_params: int = 0) -> None:
    """Refuse `action` (SpectraInputError, one line with the figures) when it would not
    fit in the memory available now."""
    if model.device != "cpu":
        return  # device memory: the library's own checks (free_bytes on the device)
    free = free_bytes("cpu")
    if free is None:
        return
    parts = need(model, action, tokens, kept_params)
    have = free + (held(model) if model.offload == "none" and "model" in model._memo else 0)
    total = sum(parts.values())
    if total <= have:
        return
    top = ", ".join(f"{k} {size(v)}" for k, v in parts.items() if v >= 1e6)
    raise SpectraInputError(
        f"{action.capitalize()} needs about {size(total)} ({top}) and {size(have)} is "
        "available: free memory, or restart the app with `--offload disk` or a smaller "
        "`--dtype`; nothing was started."
    )


def size(b: float) -> str:
    return f"{b / GB:.1f} GB" if b >= GB else f"{b / 1e6:.0f} MB"
