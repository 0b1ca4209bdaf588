"""Every compression method, by name: `METHODS`, in display order.

A method brings one `compressors.method.Method` (kept in its own module beside its
numerics) and is registered once: one line below for the bundled ones, one
`register(Method(...))` call for any other. Planning, previews, the CLI and the app
read this table and never name a method.
"""

from __future__ import annotations

from compressors import caldera, joint, losparse, lowrank, mpo, prune, quant
from compressors.base import config_error
from compressors.method import Knob, Method

__all__ = ["METHODS", "Knob", "Method", "compress", "make_config", "register"]

METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add `method` to METHODS (a name already taken is an error, unless it is the same
    description registered again)."""
    old = METHODS.get(method.name)
    if old is not None and old is not method:
        raise ValueError(f"method {method.name!r} is already registered")
    METHODS[method.name] = method
    return method


for _module in (lowrank, joint, losparse, caldera, mpo, quant, prune):
    register(_module.METHOD)


def method_of(config) -> Method:
    """The registered description of a config's method."""
    return METHODS[config.method]


def make_config(method: str, **knobs):
    """A validated config; unknown methods and knobs are errors that name them."""
    if method not in METHODS:
        raise config_error(
            "plan", "method", method, f"unknown method (known: {', '.join(METHODS)})"
        )
    cls = METHODS[method].config_cls
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


def needs_data(config) -> bool:
    """Whether a config reads calibration (False for None, dense)."""
    return config is not None and method_of(config).needs_data(config)


def compress(weight, config, calib=None):
    """Compress one weight (out, in), or a joint group's list of weights, with the method
    its config belongs to.

    Every method computes in torch on the weight's device (a GPU when the model is on
    one; decompositions in float64 where the method needs them); the calibration Gram
    is moved there first. The factorization comes back on that device, so the compact
    modules run where the model runs."""
    from compressors.base import Calibration
    from compressors.io import to_device

    group = isinstance(weight, list | tuple)
    device = (weight[0] if group else weight).device
    if calib is not None and calib.hessian.device != device:
        calib = Calibration(calib.hessian.to(device), calib.count)
    return to_device(METHODS[config.method].compress(weight, config, calib), device)
