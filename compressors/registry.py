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
    """Compress one weight (out, in) with the method its config belongs to."""
    return REGISTRY[config.method][1](weight, config, calib)
