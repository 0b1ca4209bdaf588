"""Per-module sensitivity of the model's loss to compressing that module.

- `fisher`: one pass over calibration windows accumulates the squared gradient of
  each window's summed token NLL, divided by its token count, for every linear
  weight: F ~ E_token[g^2] if tokens within a window contribute independent
  gradients (the usual per-sample empirical Fisher, estimated per window). The
  predicted mean-NLL increase of replacing W by W_hat is 0.5 * sum F (W - W_hat)^2
  (second-order Taylor at a trained optimum, Hessian ~ Fisher), for any candidate,
  with no further forward pass.
- `ppl`: the measured mean-NLL increase on a small token budget when only that module
  is replaced by its reconstruction at a probe setting: the slow exact reference.
  One forward pass per module; the other weights stay dense.

- `calib`: H = X^T X of every linear module's inputs in the transformer blocks, for
  the calibration-weighted error tr(E H E^T) / tr(W H W^T) (spectra.plan.candidates):
  the calibration cache of spectra.data.calibration (32,768 tokens in windows of 512
  by default, as `spectra calibrate`).

  With it, `importance`: the loss weight of each module's outputs, so that damage is
  the predicted loss increase and compares across modules (see `output_fisher`).

Fisher and ppl are cached under cache/sensitivity/, keyed (Model.cache_key) by the
weights' content fingerprint, the working dtype, the corpus, token count, window
length and (for ppl) the probe settings.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass

import torch

from compressors import blocks
from compressors.apply import linear_targets
from compressors.registry import PROBES, compress
from spectra.data import calibration, gradients
from spectra.data import perplexity as ev
from spectra.errors import SpectraInputError
from spectra.io import cache
from spectra.io.model import Model
from spectra.plan.defaults import DEFAULT_PROBE

KINDS = ("fisher", "ppl", "calib")


@dataclass(frozen=True)
class SensitivitySettings:
    kind: str = "fisher"  # fisher | ppl | calib
    corpus: str = "builtin"
    tokens: int | None = None  # fisher 4096, calib 32768 calibration tokens; ppl 512 per probe
    seqlen: int | None = None  # calib: 512 or the model's context if shorter; else 256
    probe: str = DEFAULT_PROBE  # ppl only: one of PROBES (each method's `probes`)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise SpectraInputError(f"sensitivity {self.kind!r}: use {', '.join(KINDS)}")
        if self.tokens is None:
            default = {"ppl": 512, "fisher": 4096, "calib": calibration.DEFAULT_TOKENS}
            object.__setattr__(self, "tokens", default[self.kind])
        if self.seqlen is None and self.kind != "calib":
            object.__setattr__(self, "seqlen", 256)
        if self.probe not in PROBES:
            raise SpectraInputError(f"probe {self.probe!r}: known are {', '.join(PROBES)}")
        seqlen = calibration.DEFAULT_SEQLEN if self.seqlen is None else self.seqlen
        if self.tokens < seqlen or seqlen < 2:
            raise SpectraInputError(
                f"tokens={self.tokens}, seqlen={self.seqlen}: need at least one window"
            )

    def calib_spec(self, model: Model) -> calibration.CalibrationSpec:
        """The calibration of `model` (spectra calibrate) that the `calib` kind reads."""
        return calibration.for_model(model, self.corpus, self.tokens, self.seqlen)


def _windows(tokenizer, settings: SensitivitySettings, split: str):
    stream = ev.token_stream(tokenizer, settings.corpus, split)
    return stream.windows(settings.seqlen, settings.tokens)


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


@dataclass
class Calibrated:
    """What calibration-weighted damage reads: each module's H (with the calibration's
    row count) and, unless switched off, its outputs' loss weights (`output_fisher`)."""

    hessians: dict
    rows: int
    importance: dict | None


def calibrated(
    model: Model,
    settings: SensitivitySettings,
    use_cache: bool = True,
    progress=None,
    network=None,
    importance: bool = True,
) -> Calibrated:
    """The cached calibration of `model` and, from gradients on its first
    IMPORTANCE_TOKENS tokens (never the evaluation part), the modules' output weights,
    cached beside it. `network`: the loaded torch model to run, else the model's shared
    one (as it was opened: dtype, offload; a model streamed from disk works)."""
    spec_c = settings.calib_spec(model)
    grams = calibration.calibrate(
        model, spec_c, network=network, use_cache=use_cache, progress=progress
    )
    if not importance:
        return Calibrated(grams.hessians(), grams.tokens, None)
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
    return Calibrated(grams.hessians(), grams.tokens, found)


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


def ppl_probe(model, windows, probe, progress=None, names=None) -> dict[str, dict]:
    """Measured mean-NLL increase per module at its probe setting (others dense).

    `probe(m, n)` gives the config for an (m, n) module; `names` limits the modules.
    Returns, per module, the loss increase and the probe's squared relative error.
    """

    targets = linear_targets(model)
    if names is not None:
        targets = {k: v for k, v in targets.items() if k in set(names)}
    device = next(model.parameters()).device
    windows = windows.to(device)
    base = _mean_nll(model, windows)
    out = {}
    for i, (name, (target, mod)) in enumerate(targets.items()):
        w = target.weight(mod)
        config = probe(*target.shape)
        approx = compress(w.detach().float().cpu(), config).to_dense().to(w.dtype).to(device)
        err2 = float((w.double() - approx.double()).pow(2).sum() / w.double().pow(2).sum())
        old = mod.weight.data
        mod.weight.data = approx.T.contiguous() if target.conv1d else approx
        try:
            loss = _mean_nll(model, windows)
        finally:
            mod.weight.data = old
        out[name] = {"delta_loss": loss - base, "err2": err2, "config": asdict(config)}
        if progress:
            progress(i + 1, len(targets), name)
    return out


def _mean_nll(model, windows, batch: int = 4) -> float:
    """Mean token NLL over equal-length windows (spectra.data.perplexity's convention)."""

    with torch.no_grad():
        nll = [
            ev.window_nll(model, windows[lo : lo + batch]) for lo in range(0, len(windows), batch)
        ]
    return float(torch.cat(nll).mean())


def compute(
    model: Model,
    settings: SensitivitySettings,
    use_cache: bool = True,
    progress=None,
    network=None,
    info: dict | None = None,
    names: list[str] | None = None,
):
    """Cached sensitivity of `model`: {name: Fisher tensor} or {name: probe result}.

    `network`: the loaded torch model to run, else the model's shared one (as it was
    opened; fisher and calib work on a model streamed from disk); `names`: probe only
    these modules (ppl).
    """
    info = {} if info is None else info
    if settings.kind == "calib":
        grams = calibration.calibrate(
            model,
            settings.calib_spec(model),
            network=network,
            use_cache=use_cache,
            progress=progress,
            info=info,
        )
        return grams.hessians()

    tokenizer = model.tokenizer()
    bos = ev.bos_token(tokenizer)  # the windows differ with and without BOS
    key = model.cache_key(asdict(settings), sorted(names) if names else None, bos)
    folder = cache.cache_dir() / "sensitivity"
    path = folder / f"{key}.{'safetensors' if settings.kind == 'fisher' else 'json'}"
    info.update(cached=False, path=str(path))
    if use_cache:
        hit = _read(path, settings.kind)
        if hit is not None:
            info.update(cached=True)
            return hit
    split = "calib" if settings.kind == "fisher" else "eval"
    windows = _windows(tokenizer, settings, split)
    model = network if network is not None else model.shared()
    if settings.kind == "ppl" and blocks.is_streamed(model):
        raise SpectraInputError(
            "--sensitivity ppl swaps each module in a resident model; use --offload none, "
            "or fisher or calib, which stream"
        )
    if settings.kind == "fisher":
        result = fisher(model, windows, progress)
    else:
        result = ppl_probe(model, windows, PROBES[settings.probe], progress, names)
    if use_cache:
        _write(path, settings.kind, result)
    return result


def _read(path, kind):
    if not path.is_file():
        return None
    try:
        if kind == "fisher":
            from safetensors.torch import load_file

            return {k: v.float() for k, v in load_file(path).items()}
        data = cache.read_json(path)
        return data if isinstance(data, dict) and data else None
    except Exception:  # a truncated or garbage file is a miss, recomputed
        return None


def _write(path, kind, result) -> None:
    if kind == "ppl":
        cache.write_json(path, result)
        return
    from safetensors.torch import save_file

    # bfloat16 keeps float32's range (squared gradients reach 1e-20) at half the size
    with cache.atomic_path(path) as tmp:
        save_file({k: v.to(torch.bfloat16) for k, v in result.items()}, str(tmp))


def scores(result: dict, kind: str, weights: dict | None = None) -> dict[str, float]:
    """One number per module for a heatmap: the measured loss increase (ppl) or the
    Fisher-predicted one at the lowrank-half probe (fisher; needs `weights`)."""
    if kind == "ppl":
        return {k: v["delta_loss"] for k, v in result.items()}

    out = {}
    for name, f in result.items():
        w = weights[name].float()
        approx = compress(w, PROBES[DEFAULT_PROBE](*w.shape)).to_dense().float()
        out[name] = 0.5 * float((f * (w - approx).pow(2)).sum(dtype=torch.float64))
    return out
