"""The compact parameters of a compressed model, made trainable for healing and folded back.

Healing (spectra.data.heal) trains only what a factorization stores in float, as
each method's factorization class says (compressors.base.Factorization: `healable`,
`train`, `float_factors`, `refold`): low-rank factors (`lowrank`), joint's shared
projection and per-member factors, LoSparse's factors and its sparse values on their
fixed support, MPO cores (and the input scaling of the calibrated form), CALDERA's L
and R. Everything else stays frozen: the backbone Q of CALDERA, `quant` codes,
`prune` masks and values, biases, and every module the plan left dense, except those
of the blocks that `width` narrowed: there every plain nn.Linear weight is trained (the
smaller model is what is distilled). This module names no method.

`Trainable(model, factorizations)` turns the model's compact modules into training
form in place: every parameter above has requires_grad and shares its tensor with the
factorization, so an optimizer step updates the factorization itself. Quantized
factors (CALDERA's and every other method's at factor_bits < 16) are trained in float
and quantized again by `finish()` on the grid they were stored with (bits, group size,
symmetric or not), round-to-nearest. With `ste=True` they are trained through that
grid: the forward sees each one quantized again as `finish()` will store it, and the
gradient passes through the rounding unchanged (the straight-through estimator of
Bengio et al. 2013, as in quantization-aware training), so what is saved is what the
last step computed. `finish()` puts the ordinary compact modules back and returns the
factorizations to save.
"""

from __future__ import annotations

from torch import nn
from torch.nn.utils import parametrize

from compressors import factors
from compressors.base import units


class Trainable:
    """Training form of a compressed model's compact modules (see the module doc)."""

    def __init__(self, model: nn.Module, factorizations: dict, ste: bool = False):
        self.model = model
        self.factorizations = dict(factorizations)
        self._requantize: dict[int, dict] = {}  # id(f) -> {key: old quantized factor}
        model.requires_grad_(False)
        self.units = [(names, f) for names, f in units(self.factorizations) if f.healable]
        for names, f in self.units:
            old = f.float_factors()
            if old:
                self._requantize[id(f)] = old
            modules = self._install(names, f, train=True)
            if ste and old:
                _through_grid(modules, f, {f.trained(k).data_ptr(): o for k, o in old.items()})
        for module in _narrowed_linears(model):
            module.weight.requires_grad_(True)

    @property
    def groups(self) -> dict[str, list[str]]:
        """{first member: member names} of every trained factorization."""
        return {names[0]: names for names, _ in self.units}

    def _install(self, names: list[str], f, train: bool) -> list[nn.Module]:
        biases = [self.model.get_submodule(n).bias for n in names]
        biases = [None if b is None else b.detach() for b in biases]
        modules = f.member_modules(biases)
        for name, module in zip(names, modules, strict=True):
            if train:
                f.train(module)
            parent, _, child = name.rpartition(".")
            setattr(self.model.get_submodule(parent) if parent else self.model, child, module)
        return modules

    def named_parameters(self) -> dict[str, nn.Parameter]:
        """The trainable parameters by their name in the model (shared ones once)."""
        out, seen = {}, set()
        for name, p in self.model.named_parameters(remove_duplicate=False):
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                out[name] = p
        return out

    @property
    def quantized_factors(self) -> bool:
        """Whether some trained factors go back to a quantization grid at `finish`."""
        return bool(self._requantize)

    def finish(self) -> dict:
        """Quantize trained factors back to their grids, reinstall the ordinary compact
        modules (frozen) and return the factorizations."""
        for names, f in self.units:
            for key, old in self._requantize.pop(id(f), {}).items():
                f.refold(key, old)
            self._install(names, f, train=False)
        self.model.requires_grad_(False)
        return self.factorizations


def _narrowed_linears(model: nn.Module) -> list[nn.Linear]:
    """The plain nn.Linear modules of the blocks that width narrowed (width_model
    marks such a block with `width_kept`)."""
    return [
        m
        for block in model.modules()
        if getattr(block, "width_kept", None) is not None
        for m in block.modules()
        if type(m) is nn.Linear
    ]


class _ThroughGrid(nn.Module):
    """A parametrization: the value on its grid forward, the identity backward."""

    def __init__(self, old, on_grid=None):
        super().__init__()
        self.old, self.on_grid = old, on_grid or factors.requantize

    def forward(self, x):
        q = self.on_grid(x.detach(), self.old).to_dense().reshape(x.shape).to(x.dtype)
        return x + (q - x).detach()


def _through_grid(modules: list[nn.Module], f, grids: dict[int, object]) -> None:
    """Parametrize every trainable tensor of `modules` that is a quantized factor of `f`."""
    for module in modules:
        for pname, p in list(module.named_parameters(remove_duplicate=False)):
            old = grids.get(p.data_ptr()) if p.requires_grad else None
            if old is None or ".parametrizations." in f".{pname}":
                continue
            owner, _, attr = pname.rpartition(".")
            target = module.get_submodule(owner) if owner else module
            parametrize.register_parametrization(target, attr, _ThroughGrid(old, f.on_grid))
