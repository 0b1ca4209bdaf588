"""`spectra plan auto --method width`: each decoder block's MLP width for a parameter
budget (`--target-params`: the fraction of the linear parameters kept).

Three ways to share the budget among blocks, each rounded to a multiple of
`multiple` neurons (32: what GGUF's quantized row blocks need):

- `loss` (the default): the least predicted loss increase. A block's damage at k
  neurons is 0.5 sum_i F_i (E H E^T)_ii / rows, E = W_down - W_down' the error the
  greedy choice of k neurons with the refit leaves (compressors.width.greedy_neurons
  on down_proj with its output channels weighted by sqrt(F)), F_i the mean squared
  gradient of the loss with respect to down_proj's output i (`output_fisher`, from
  the calibration's first windows, cached beside it): the second-order loss increase
  of that error. One greedy run gives the whole curve of a block (kept for the next
  budget). On a resident model each curve is then anchored (`anchor_kl`): scaled so
  that at the budget's uniform width it equals the measured KL of the model with that
  block alone narrowed (Puzzle's replace-one-block score, on the calibration's last
  four windows); the convex-hull Lagrangian of spectra.plan.allocate shares the
  budget. The second-order estimate alone put about twice as much damage on the first
  blocks, relative to the last, as the measured KL did, and kept them too wide. On the
  demo (unhealed, whole evaluation part) at 90 / 80 / 70% of the parameters: anchored
  13.45 / 14.52 / 16.32; second order alone 13.51 / 14.81 / 16.55; uniform
  13.59 / 14.64 / 17.09; each block's plain output error (no F) 14.41 / 16.58 / 21.51.
- `uniform`: one width in every block.
- `erank`: each block's width proportional to the effective rank of its intermediate
  activation spectrum (the singular values of Z, the square roots of H's
  eigenvalues), scaled to the budget.

Only `ffn` is allocated; key/value heads and skipped sublayers are set by hand.
"""

from __future__ import annotations

import math
import time

import numpy as np

from spectra.errors import SpectraInputError
from spectra.plan.allocate import Candidate, Unit, allocate
from spectra.plan.block_plan import blocks

ALLOCATE = ("loss", "uniform", "erank")
MULTIPLE = 32
_UNITS: dict = {}  # the last model's loss units (its calibration, importance, multiple)


def mlp_blocks(mats) -> list[dict]:
    """Every block's MLP as allocation sees it: name, neurons, parameters per neuron."""
    out = []
    for name, members in blocks(mats).items():
        roles = {m.role: m for m in members}
        if not all(r in roles for r in ("gate", "up", "down")):
            raise SpectraInputError(
                f"{name}: width needs a gated MLP (gate, up and down projections)"
            )
        per = roles["gate"].shape[1] + roles["up"].shape[1] + roles["down"].shape[0]
        out.append(dict(name=name, down=roles["down"].name, n=roles["down"].shape[1], per=per))
    return out


def widths(n: int, multiple: int) -> list[int]:
    """The widths offered a block of n neurons: multiples of `multiple`, and n."""
    return sorted({*range(multiple, n, multiple), n})


def allocate_widths(model, target: float, how: str, grams=None, multiple: int = MULTIPLE,
                    progress=None, importance=None, uniform: bool = False,
                    anchor: bool = True) -> tuple[dict[str, int], dict]:  # fmt: skip
    """({block name: MLP width}, facts) meeting `target` (fraction of linear parameters
    kept) by `how` (ALLOCATE); `grams`: the calibration, read a block at a time (loss
    and erank); `importance`: the modules' output loss weights (`output_fisher`), which
    put loss's damage in loss units (None: the plain output error); `uniform`: then one
    width in every block, the widest the budget allows (the allocation's own widths
    kept in facts["proposed"]); `anchor` (loss with importance, a resident model): each
    block's curve scaled to its measured KL at the uniform width (`anchor_kl`)."""
    mlps, total, fixed, budget = check(model, target, how, multiple)
    t0 = time.perf_counter()
    facts: dict = {"allocate": how, "multiple": multiple}
    if how == "uniform":
        chosen = _uniform(mlps, budget, multiple)
    elif how == "erank":
        ranks = _eranks(mlps, grams, progress)
        facts["erank"] = {b["name"]: round(r, 1) for b, r in zip(mlps, ranks, strict=True)}
        chosen = _scaled(mlps, ranks, budget, multiple)
    else:
        # one greedy run per block serves every budget: kept for a cached calibration
        # (its folder names the weights and the settings; the importance is its own)
        folder = getattr(grams, "folder", None)
        key = (str(model), str(folder), multiple, importance is None) if folder else None
        if key is None or _UNITS.get("key") != key:
            _UNITS.update(key=key, anchors={}, units=_loss_units(
                model, mlps, grams, multiple, progress, importance))  # fmt: skip
        units = _UNITS["units"]
        facts["damage_kind"] = "loss (output Fisher)" if importance else "output error"
        if anchor and importance is not None and getattr(model, "offload", "none") == "none":
            at = _uniform(mlps, budget, multiple)
            memo = _UNITS["anchors"]
            if key is None or tuple(at.items()) not in memo:
                memo[tuple(at.items())] = anchor_kl(model, mlps, units, grams, at, progress)
            measured = memo[tuple(at.items())]
            units = anchored(units, measured)
            facts["damage_kind"] = "loss (output Fisher, anchored on measured KL)"
            facts["anchor"] = measured
        picked = allocate(units, budget, "params")
        chosen = {u.names[0]: c.config for u, c in zip(units, picked, strict=True)}
        facts["damage"] = {u.names[0]: c.damage for u, c in zip(units, picked, strict=True)}
    if uniform and how != "uniform":  # the allocation's widths kept, its damage not
        facts["proposed"], chosen = chosen, _uniform(mlps, budget, multiple)
        facts.pop("damage", None)
    facts["uniform"] = uniform or how == "uniform"
    kept = fixed + sum(b["per"] * chosen[b["name"]] for b in mlps)
    facts.update(params_ratio=kept / total, seconds=round(time.perf_counter() - t0, 2))
    return chosen, facts


def _uniform(mlps, budget: int, multiple: int) -> dict[str, int]:
    """One width in every block: the widest multiple of `multiple` within the budget."""
    common = sorted({w for b in mlps for w in widths(b["n"], multiple)})
    fit = [w for w in common if sum(b["per"] * min(w, b["n"]) for b in mlps) <= budget]
    return {b["name"]: min(fit[-1], b["n"]) for b in mlps}


def check(model, target: float, how: str, multiple: int = MULTIPLE):
    """(MLPs, linear parameters, those outside the MLPs, the MLPs' budget); a setting
    that cannot be met is an input error, raised before anything is computed."""
    if how not in ALLOCATE:
        raise SpectraInputError(
            f"--allocate {how!r}: with --method width one of {', '.join(ALLOCATE)}"
        )
    if not 0 < target <= 1:
        raise SpectraInputError(f"--target-params {target}: must be in (0, 1]")
    if multiple < 1:
        raise SpectraInputError(f"--multiple {multiple}: must be a whole number of neurons >= 1")
    mats = [m for m in model.matrices if m.role != "embed"]
    mlps = mlp_blocks(mats)
    total = sum(m.shape[0] * m.shape[1] for m in mats)
    fixed = total - sum(b["per"] * b["n"] for b in mlps)
    budget = int(target * total) - fixed  # parameters the MLPs may keep
    least = sum(b["per"] * min(multiple, b["n"]) for b in mlps)
    if budget < least:
        raise SpectraInputError(
            f"--target-params {target}: width keeps at least {multiple} neurons per MLP, "
            f"{(fixed + least) / total:.3f} of the linear parameters"
        )
    return mlps, total, fixed, budget


def _need(grams, how: str):
    if grams is None:
        raise SpectraInputError(f"--allocate {how} with --method width needs a calibration")
    return grams


def _block_index(name: str) -> int:
    return int(name.rsplit(".", 1)[1])


def intermediate_spectrum(h) -> tuple[np.ndarray, float]:
    """(singular values of the intermediate activations Z, descending; their effective
    rank, exp of the entropy of s / sum s) from down_proj's input Gram H = Z^T Z."""
    import torch

    s = torch.linalg.eigvalsh(h.to(torch.float64)).clamp_min(0).sqrt().flip(0).numpy()
    p = s / s.sum()
    p = p[p > 0]
    return s, float(np.exp(-(p * np.log(p)).sum()))


def _eranks(mlps, grams, progress) -> list[float]:
    grams = _need(grams, "erank")
    out = []
    for i, b in enumerate(mlps):
        out.append(intermediate_spectrum(grams[_block_index(b["name"])][b["down"]][0])[1])
        if progress:
            progress(i + 1, len(mlps), b["name"])
    return out


def _scaled(mlps, ranks, budget: int, multiple: int) -> dict[str, int]:
    """Widths proportional to `ranks`, the largest scale that fits the budget."""

    def at(scale: float) -> dict[str, int]:
        out = {}
        for b, r in zip(mlps, ranks, strict=True):
            w = max(multiple, math.floor(scale * r / multiple) * multiple)
            out[b["name"]] = b["n"] if w >= b["n"] else w
        return out

    def cost(got) -> int:
        return sum(b["per"] * got[b["name"]] for b in mlps)

    lo, hi = 0.0, max(b["n"] / max(r, 1e-9) for b, r in zip(mlps, ranks, strict=True)) * 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cost(at(mid)) <= budget else (lo, mid)
    return at(lo)


def _loss_units(model, mlps, grams, multiple: int, progress, importance=None) -> list[Unit]:
    """One allocation unit per block: its widths, each with the greedy residual, each
    output channel i of down_proj weighted by F_i, the mean squared gradient of the loss
    with respect to it (`importance`), so the damage is the predicted loss increase,
    0.5 sum_i F_i (E H E^T)_ii / rows, up to one factor for every block."""
    import torch

    from compressors.width import greedy_neurons

    grams = _need(grams, "loss")
    units = []
    for i, b in enumerate(mlps):
        block = grams[_block_index(b["name"])]
        h = block[b["down"]][0]
        down = torch.from_numpy(model.matrix(b["down"]).read())
        if importance is not None and b["down"] in importance:
            f = importance[b["down"]][0].to(down.dtype).clamp_min(0)
            down = down * f.sqrt()[:, None]
        gains: list[float] = []
        greedy_neurons(down, h, b["n"], gains)
        w = down.to(torch.float64)
        start = float(torch.einsum("ij,jk,ik->", w, h.to(torch.float64), w))
        left = start - np.concatenate([[0.0], np.cumsum(gains)])
        cands = [
            Candidate(k, b["per"] * k, 16 * b["per"] * k, max(float(left[k]), 0.0))
            for k in widths(b["n"], multiple)
        ]
        units.append(Unit((b["name"],), cands, b["per"] * b["n"], "mlp"))
        if progress:
            progress(i + 1, len(mlps), b["name"])
    return units


ANCHOR_WINDOWS = 4  # calibration windows (its last ones) the anchors' KL is measured on


def anchor_kl(model, mlps, units, grams, at: dict[str, int], progress=None) -> dict:
    """Each block's measured damage at its width in `at` (the uniform width of the
    budget): the mean per-token KL(dense || the model with that block's MLP alone
    narrowed as apply narrows it) on the calibration's last ANCHOR_WINDOWS windows (the
    output Fisher reads its first ones), beside the second-order prediction there.
    Puzzle's replace-one-block score: it measures what the second-order estimate
    extrapolates, including how the rest of the network amplifies the error. The
    shared model's block is changed for the measurement and restored."""
    import torch

    from compressors.blocks import decoder_layers
    from compressors.registry import make_config
    from compressors.width_model import MLP, shrink_block
    from spectra.data import calibration

    net = model.shared()
    layers = decoder_layers(net)
    device = next(net.parameters()).device
    windows = calibration.calibration_windows(model.tokenizer(), grams.settings)
    windows = [w[None].to(device) for w in windows[-ANCHOR_WINDOWS:]]

    def logprobs(x):
        return torch.log_softmax(net(x, use_cache=False).logits[0].float(), -1)

    out: dict = {"width": at, "windows": len(windows), "kl": {}, "predicted": {}}
    with torch.no_grad():
        ref = [logprobs(x) for x in windows]
        for i, (b, unit) in enumerate(zip(mlps, units, strict=True)):
            k = at[b["name"]]
            if k < b["n"]:
                index = _block_index(b["name"])
                mlp = layers[index].mlp
                saved = {a: getattr(mlp, a) for a in MLP}
                try:
                    shrink_block(net, index, make_config("width", ffn=k), grams[index])
                    kl = sum(
                        float((p.exp() * (p - logprobs(x))).sum(-1).mean())
                        for x, p in zip(windows, ref, strict=True)
                    )
                finally:
                    for a, m in saved.items():
                        setattr(mlp, a, m)
                    layers[index].__dict__.pop("width_kept", None)
                out["kl"][b["name"]] = kl / len(windows)
                out["predicted"][b["name"]] = next(
                    c.damage for c in unit.candidates if c.config == k
                )
            if progress:
                progress(i + 1, len(mlps), f"{b['name']} (KL)")
    return out


def anchored(units, measured: dict) -> list[Unit]:
    """`units` with each block's damage curve scaled by measured / predicted at its
    anchor (the median scale where a block has none: kept whole, or nothing predicted)."""
    scale = {
        n: kl / measured["predicted"][n]
        for n, kl in measured["kl"].items()
        if measured["predicted"][n] > 0 and kl > 0
    }
    fallback = float(np.median(list(scale.values()))) if scale else 1.0
    out = []
    for u in units:
        s = scale.get(u.names[0], fallback)
        cands = [Candidate(c.config, c.params, c.bits, c.damage * s) for c in u.candidates]
        out.append(Unit(u.names, cands, u.params_before, u.role))
    return out


def width_plan(model, target: float, how: str, grams=None, multiple: int = MULTIPLE,
               progress=None, importance=None, uniform: bool = False,
               anchor: bool = True):  # fmt: skip
    """(plan, facts): `allocate_widths` written as a plan of `layers` block entries
    (a block kept whole has none), on the calibration it was scored on."""
    from compressors.registry import make_config
    from spectra.plan.format import Plan

    chosen, facts = allocate_widths(
        model, target, how, grams, multiple, progress, importance, uniform, anchor
    )
    full = {b["name"]: b["n"] for b in mlp_blocks(model.matrices)}
    layers = {
        name: make_config("width", ffn=k, select="greedy" if grams is not None else "norm")
        for name, k in chosen.items()
        if k < full[name]
    }
    record = dict(facts, strategy="width", widths=chosen)
    calib = grams.settings if grams is not None else Plan().calibration
    return Plan(model=str(model), calibration=calib, layers=layers, allocation=record), facts
