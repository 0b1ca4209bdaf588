"""Every compression method, by name: `METHODS`, in display order.

A method brings one `compressors.method.Method` (kept in its own module beside its
numerics) and is registered once: one line below for the bundled ones, one
`register(Method(...))` call for any other (`unregister`, or `registered(...)` as a
context manager, takes it away again). Planning, previews, io, healing, exports, the
CLI and the app read this table and never name a method. `groups` is the one rule of
which modules a plan treats together.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable

from compressors import caldera, io, joint, losparse, lowrank, mpo, prune, quant, width
from compressors.base import config_error
from compressors.method import Knob, Method

__all__ = [
    "METHODS",
    "PROBES",
    "Knob",
    "Method",
    "compress",
    "groups",
    "make_config",
    "register",
    "unregister",
]

METHODS: dict[str, Method] = {}
# the `ppl` sensitivity's probes of every registered method, by probe name (kept in
# step with METHODS, so that a dict read once stays current)
PROBES: dict[str, Callable] = {}


def register(method: Method) -> Method:
    """Add `method` to METHODS (a name already taken is an error, unless it is the same
    description registered again; so is a probe name another method has)."""
    old = METHODS.get(method.name)
    if old is not None and old is not method:
        raise ValueError(f"method {method.name!r} is already registered")
    for probe in method.probes:
        if PROBES.get(probe, method.probes[probe]) is not method.probes[probe]:
            raise ValueError(f"method {method.name}: probe {probe!r} is already registered")
    METHODS[method.name] = method
    PROBES.update(method.probes)
    io.CLASSES.update((_qualified(cls), cls) for cls in method.factorizations)
    return method


def unregister(name: str) -> Method:
    """Take method `name` out of METHODS (and its probes out of PROBES)."""
    method = METHODS.pop(name)
    for probe in method.probes:
        PROBES.pop(probe, None)
    for cls in method.factorizations:
        io.CLASSES.pop(_qualified(cls), None)
    return method


def _qualified(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


@contextlib.contextmanager
def registered(method: Method):
    """`method` registered for the duration of a with block (a test's toy method)."""
    register(method)
    try:
        yield method
    finally:
        unregister(method.name)


for _module in (lowrank, joint, losparse, caldera, mpo, quant, prune, width):
    register(_module.METHOD)


def module_methods() -> tuple[str, ...]:
    """The methods a plan applies to one linear module (or a family of them)."""
    return tuple(name for name, m in METHODS.items() if m.scope == "module")


def block_methods() -> tuple[str, ...]:
    """The methods a plan applies to a whole decoder block (width)."""
    return tuple(name for name, m in METHODS.items() if m.scope == "block")


def is_block_config(config) -> bool:
    """Whether `config` belongs to a block-scope method (its plan targets name blocks)."""
    return config is not None and METHODS[config.method].scope == "block"


def method_of(config) -> Method:
    """The registered description of a config's method."""
    return METHODS[config.method]


def method_of_factorization(f) -> Method | None:
    """The registered method whose `compress` returns factorizations like `f` (None:
    no registered method declares its class)."""
    return next((m for m in METHODS.values() if type(f) in m.factorizations), None)


def mixed() -> tuple[str, ...]:
    """The methods whose settings `plan auto --method mixed` offers every module."""
    return tuple(name for name, m in METHODS.items() if m.mixed)


def groups(
    modules: Iterable, method: Callable[[object], str | None], apart: Callable | None = None
) -> list[list]:
    """Which modules a plan treats together, in order of their first member: siblings
    under one parent whose roles are one family of their method (`Method.families`:
    joint's q, k, v under one attention), set by one source (`apart`: a plan's rule),
    are one group sharing one factorization; every other module stands alone.
    Allocation, plan resolution, apply, previews and the app all ask this.

    Args:
        modules: objects with `name` and `role`.
        method: method(module) -> the name of its method (None, or one not registered,
            such as `mixed`: alone).
        apart: apart(module) -> what keeps two groups of one parent apart (the rule
            that set them); None: nothing does.
    """
    out: list[list] = []
    by_key: dict[tuple, list] = {}
    for mod in modules:
        name = method(mod)
        family = METHODS[name].family(mod.role) if name in METHODS else None
        if family is None:
            out.append([mod])
            continue
        key = (name, apart and apart(mod), mod.name.rsplit(".", 1)[0], family)
        if key not in by_key:
            by_key[key] = []
            out.append(by_key[key])
        by_key[key].append(mod)
    return out


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

    group = isinstance(weight, list | tuple)
    device = (weight[0] if group else weight).device
    if calib is not None and calib.hessian.device != device:
        calib = Calibration(calib.hessian.to(device), calib.count)
    return io.to_device(METHODS[config.method].compress(weight, config, calib), device)
