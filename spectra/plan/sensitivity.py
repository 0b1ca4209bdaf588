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

from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from compressors import blocks
from compressors.apply import linear_targets
from compressors.registry import PROBES, compress
from spectra.data import calibration
from spectra.data import perplexity as ev
from spectra.errors import SpectraInputError
from spectra.io import cache
from spectra.io.model import Model
from spectra.plan.defaults import DEFAULT_PROBE
from spectra.plan.fisher import fisher, importance_of, output_fisher  # noqa: F401 (re-exported)


@dataclass(frozen=True)
class Kind:
    """One kind of sensitivity (`--sensitivity`), registered once (`register_kind`):
    plan auto, the CLI, the app and `spectra sensitivity` read KINDS.

    Attributes:
        name: the flag's value.
        label: the app's name for the damage it gives.
        what: what that damage measures (plan auto's summary line).
        tokens: default token budget.
        seqlen: default window length (None: the calibration's, spectra.data).
        split: the corpus part its windows come from.
        streams: whether it runs on a model streamed from disk.
        run: run(network, windows, settings, progress, names) -> the result cached
            under cache/sensitivity (None: the kind reads the calibration's cache).
        damage: damage(model, settings, use_cache, progress, network, importance) ->
            (candidates.Damage, the calibration it read or None).
        score: score(result, weights) -> one loss estimate per module at the probe.
        tensors: the result is tensors (safetensors), else JSON.
        relative: what the damage measures without the loss weights (None: always
            the loss).
        note: what computing it costs (the app's Sensitivity page says it).
    """

    name: str
    label: str
    what: str
    tokens: int
    seqlen: int | None
    split: str
    streams: bool
    damage: Callable
    run: Callable | None = None
    score: Callable | None = None
    tensors: bool = False
    relative: str | None = None
    note: str = ""

    @property
    def calibrated(self) -> bool:
        """It reads the model's calibration (spectra calibrate), not windows of its own."""
        return self.run is None


KINDS: dict[str, Kind] = {}


def register_kind(kind: Kind) -> Kind:
    """Add a kind of sensitivity (a name already taken is an error)."""
    if KINDS.get(kind.name, kind) is not kind:
        raise ValueError(f"sensitivity kind {kind.name!r} is already registered")
    KINDS[kind.name] = kind
    return kind


@dataclass(frozen=True)
class SensitivitySettings:
    kind: str = "fisher"  # a name of KINDS
    corpus: str = "builtin"
    tokens: int | None = None  # the kind's default (fisher 4096, calib 32768, ppl 512)
    seqlen: int | None = None  # the kind's default (None: the calibration's)
    probe: str = DEFAULT_PROBE  # ppl only: one of PROBES (each method's `probes`)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise SpectraInputError(f"sensitivity {self.kind!r}: use {', '.join(KINDS)}")
        kind = KINDS[self.kind]
        if self.tokens is None:
            object.__setattr__(self, "tokens", kind.tokens)
        if self.seqlen is None:
            object.__setattr__(self, "seqlen", kind.seqlen)
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
    found = importance_of(model, grams, use_cache, progress, network)
    return Calibrated(grams.hessians(), grams.tokens, found)


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
    kind = KINDS[settings.kind]
    path = folder / f"{key}.{'safetensors' if kind.tensors else 'json'}"
    info.update(cached=False, path=str(path))
    if use_cache:
        hit = _read(path, kind)
        if hit is not None:
            info.update(cached=True)
            return hit
    windows = _windows(tokenizer, settings, kind.split)
    model = network if network is not None else model.shared()
    if not kind.streams and blocks.is_streamed(model):
        streaming = ", ".join(k.name for k in KINDS.values() if k.streams)
        raise SpectraInputError(
            f"--sensitivity {kind.name} swaps each module in a resident model; use "
            f"--offload none, or {streaming}, which stream"
        )
    result = kind.run(model, windows, settings, progress, names)
    if use_cache:
        _write(path, kind, result)
    return result


def _read(path, kind: Kind):
    if not path.is_file():
        return None
    try:
        if kind.tensors:
            from safetensors.torch import load_file

            return {k: v.float() for k, v in load_file(path).items()}
        data = cache.read_json(path)
        return data if isinstance(data, dict) and data else None
    except Exception:  # a truncated or garbage file is a miss, recomputed
        return None


def _write(path, kind: Kind, result) -> None:
    if not kind.tensors:
        cache.write_json(path, result)
        return
    from safetensors.torch import save_file

    # bfloat16 keeps float32's range (squared gradients reach 1e-20) at half the size
    with cache.atomic_path(path) as tmp:
        save_file({k: v.to(torch.bfloat16) for k, v in result.items()}, str(tmp))


def scores(result: dict, kind: str, weights: dict | None = None) -> dict[str, float]:
    """One number per module for a heatmap: the kind's loss estimate at the probe
    (`weights`: the modules' weights, where the kind needs them)."""
    return KINDS[kind].score(result, weights)


def _fisher_scores(result: dict, weights: dict) -> dict[str, float]:
    """The Fisher-predicted loss increase at the default probe."""
    out = {}
    for name, f in result.items():
        w = weights[name].float()
        approx = compress(w, PROBES[DEFAULT_PROBE](*w.shape)).to_dense().float()
        out[name] = 0.5 * float((f * (w - approx).pow(2)).sum(dtype=torch.float64))
    return out


def _measured_scores(result: dict, weights=None) -> dict[str, float]:
    return {k: v["delta_loss"] for k, v in result.items()}


def _calib_damage(model, settings, use_cache, progress, network, importance):
    from spectra.plan.candidates import Damage

    got = calibrated(model, settings, use_cache, progress, network, importance=importance)
    damage = Damage(hessian=got.hessians, importance=got.importance, rows=got.rows)
    return damage, settings.calib_spec(model)


def _fisher_damage(model, settings, use_cache, progress, network, importance):
    from spectra.plan.candidates import Damage

    return Damage(fisher=compute(model, settings, use_cache, progress, network)), None


def _ppl_damage(model, settings, use_cache, progress, network, importance):
    from spectra.plan.candidates import Damage

    result = compute(model, settings, use_cache, progress, network)
    scale = {k: v["delta_loss"] / max(v["err2"], 1e-30) for k, v in result.items()}
    return Damage(scale=scale), None


for _kind in (
    Kind(
        "fisher",
        "Fisher loss",
        "Fisher-predicted loss increase (nats/token)",
        tokens=4096,
        seqlen=256,
        split="calib",
        streams=True,
        damage=_fisher_damage,
        run=lambda net, windows, settings, progress, names: fisher(net, windows, progress),
        score=_fisher_scores,
        tensors=True,
        note="one gradient pass",
    ),
    Kind(
        "ppl",
        "measured loss (one pass per module)",
        "probe-scaled loss increase (nats/token)",
        tokens=512,
        seqlen=256,
        split="eval",
        streams=False,
        damage=_ppl_damage,
        run=lambda net, windows, settings, progress, names: ppl_probe(
            net, windows, PROBES[settings.probe], progress, names
        ),
        score=_measured_scores,
        note="one forward pass per module, slow",
    ),
    Kind(
        "calib",
        "calibration-weighted loss",
        "calibration-weighted loss increase (nats/token)",
        tokens=calibration.DEFAULT_TOKENS,
        seqlen=None,
        split="calib",
        streams=True,
        damage=_calib_damage,
        relative="sum of relative calibration-weighted errors",
        note="the Plan page's calibration",
    ),
):
    register_kind(_kind)
