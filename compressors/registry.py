"""Method name -> (config class, compress function). Adding a method adds one line here."""

from __future__ import annotations

from compressors import caldera, joint, losparse, lowrank, mpo, prune, quant
from compressors.base import config_error

REGISTRY = {
    "lowrank": (lowrank.LowRankConfig, lowrank.compress),
    "joint": (joint.JointConfig, joint.compress),
    "losparse": (losparse.LoSparseConfig, losparse.compress),
    "caldera": (caldera.CalderaConfig, caldera.compress),
    "mpo": (mpo.MPOConfig, mpo.compress),
    "quant": (quant.QuantConfig, quant.compress),
    "prune": (prune.PruneConfig, prune.compress),
}


def make_config(method: str, **knobs):
    """A validated config; unknown methods and knobs are errors that name them."""
    if method not in REGISTRY:
        raise config_error(
            "plan", "method", method, f"unknown method (known: {', '.join(REGISTRY)})"
        )
    cls = REGISTRY[method][0]
    fields = set(cls.__dataclass_fields__)
    for k in knobs:
        if k not in fields:
            raise config_error(
                method,
                k,
                knobs[k],
                f"not a setting of {method} (settings: {', '.join(sorted(fields))})",
            )
    return cls(**knobs)


def compress(weight, config, calib=None):
    """Compress one weight (out, in), or a joint group's list of weights, with the method
    its config belongs to.

    The methods compute on the CPU (float64 decompositions, numpy GPTQ and TT-SVD); a
    weight on another device is compressed there and its factorization moved back to
    that device, so the compact modules run where the model runs."""
    from compressors.base import Calibration
    from compressors.io import to_device

    group = isinstance(weight, list | tuple)
    device = (weight[0] if group else weight).device
    fn = REGISTRY[config.method][1]
    if device.type == "cpu":
        return fn(weight, config, calib)
    weight = [w.detach().cpu() for w in weight] if group else weight.detach().cpu()
    if calib is not None:
        calib = Calibration(calib.hessian.cpu(), calib.count)
    return to_device(fn(weight, config, calib), device)
