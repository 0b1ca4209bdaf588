"""Gradient statistics a block at a time: the diagonal empirical Fisher of every linear
weight (`fisher`), and the loss weight of every module's outputs with its inputs'
second moments (`output_fisher`: what makes a calibration-weighted error a loss
estimate). Backpropagated one block at a time, so a model streamed from disk works."""

from __future__ import annotations

import contextlib

import torch

from compressors.apply import linear_targets
from spectra.data import calibration, gradients
from spectra.io import cache


def fisher(model, windows, progress=None) -> dict[str, torch.Tensor]:
    """Diagonal empirical Fisher of every linear weight, (out, in) float32 on the CPU;
    backpropagated a block at a time, so a model streamed from disk works too."""
    targets = linear_targets(model)
    acc = {
        name: torch.zeros(t.shape[::-1] if t.conv1d else t.shape, dtype=torch.float32)
        for name, (t, _) in targets.items()
    }
    scope: dict = {}
    tokens = windows.shape[1] - 1

    class Visitor:
        def before(self, index, module):
            scope.clear()
            scope.update(gradients.in_scope(model, targets, index, module))
            for _, mod in scope.values():
                mod.weight.requires_grad_(True)

        def tensors(self):
            return [mod.weight for _, mod in scope.values()]

        def receive(self, window, grads):
            for name, g in zip(scope, grads, strict=True):
                if g is not None:
                    acc[name] += g.float().pow(2).cpu() / tokens

        def after(self, index):
            for _, mod in scope.values():
                mod.weight.requires_grad_(False)

    with _frozen(model):
        gradients.backward_by_block(model, windows, Visitor(), progress)
    out = {}
    for name, (target, _) in targets.items():
        f = acc[name] / len(windows)
        out[name] = (f.T if target.conv1d else f).contiguous()
    return out


@contextlib.contextmanager
def _frozen(model):
    """Every parameter without gradients for the duration (restored after)."""
    saved = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in saved.items():
            p.requires_grad_(flag)


IMPORTANCE_TOKENS = 4096  # calibration tokens whose gradients weight each module's outputs
IMPORTANCE_VERSION = 1


def output_fisher(model, windows, progress=None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per linear module: (F, A), F[i] = E_t[g_ti^2] the mean squared gradient of the
    window's summed NLL with respect to output channel i, A[j] = E_t[x_tj^2] the mean
    squared input feature j, both over every position of `windows`, float32.

    A weight error E changes output t by E x_t; to second order at a trained optimum
    (Hessian ~ Fisher, diagonal, positions independent) the mean NLL rises by
    0.5 * sum_i F_i E_t[(E x_t)_i^2] = 0.5 * sum_i F_i (E H E^T)_ii / rows with
    H = X^T X over `rows` positions: the calibration-weighted error with each output
    weighted by how much the loss cares about it, in loss units, so it compares
    across modules (the diagonal Kronecker-factored Fisher, K-FAC's G with the full A).
    A module without an H uses A: 0.5 * sum_ij F_i A_j E_ij^2.
    """

    targets = linear_targets(model)
    outs: dict[str, list] = {}
    acc_f = {n: torch.zeros(t.shape[0], dtype=torch.float64) for n, (t, _) in targets.items()}
    acc_a = {n: torch.zeros(t.shape[1], dtype=torch.float64) for n, (t, _) in targets.items()}
    handles: list = []
    calls: list = []

    def keep(name):
        def hook(module, inputs, output):
            outs.setdefault(name, []).append((inputs[0].detach(), output))

        return hook

    class Visitor:
        def before(self, index, module):
            scope = gradients.in_scope(model, targets, index, module)
            handles.extend(mod.register_forward_hook(keep(n)) for n, (_, mod) in scope.items())

        def tensors(self):
            calls[:] = [(n, x_in, y) for n, parts in outs.items() for x_in, y in parts]
            outs.clear()
            return [y for *_, y in calls]

        def receive(self, window, grads):
            for (name, x_in, _), g in zip(calls, grads, strict=True):
                if g is None:  # a call the loss does not read (the model's own last logits)
                    continue
                acc_f[name] += g.double().pow(2).reshape(-1, g.shape[-1]).sum(0).cpu()
                acc_a[name] += x_in.double().pow(2).reshape(-1, x_in.shape[-1]).sum(0).cpu()
            calls.clear()

        def after(self, index):
            for h in handles:
                h.remove()
            handles.clear()
            outs.clear()

    with _frozen(model):
        gradients.backward_by_block(model, windows, Visitor(), progress)
    positions = windows.shape[0] * windows.shape[1]
    return {n: ((acc_f[n] / positions).float(), (acc_a[n] / positions).float()) for n in targets}


def importance_of(model, grams, use_cache: bool = True, progress=None, network=None):
    """{module: (F, A)} (`output_fisher`) on the first IMPORTANCE_TOKENS tokens of the
    calibration `grams` was computed on, cached beside it."""
    spec_c = grams.settings
    n = max(1, min(spec_c.samples, IMPORTANCE_TOKENS // spec_c.seqlen))
    path = grams.folder / f"importance-v{IMPORTANCE_VERSION}-{n}.safetensors"
    found = _read_importance(path) if use_cache else None
    if found is None:
        windows = calibration.calibration_windows(model.tokenizer(), spec_c)[:n]
        found = output_fisher(network if network is not None else model.shared(), windows, progress)
        if use_cache:
            from safetensors.torch import save_file

            flat = {
                f"{k}|{part}": t for k, (f, a) in found.items() for part, t in (("F", f), ("A", a))
            }
            with cache.atomic_path(path) as tmp:
                save_file(flat, str(tmp))
    return found


def _read_importance(path):
    if not path.is_file():
        return None
    try:
        from safetensors.torch import load_file

        flat = load_file(path)
        names = {k.rpartition("|")[0] for k in flat}
        return {n: (flat[f"{n}|F"].float(), flat[f"{n}|A"].float()) for n in names}
    except Exception:  # a truncated or garbage file is a miss, recomputed
        return None
