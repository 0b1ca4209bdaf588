"""The compact parameters of a compressed model, made trainable for healing and folded back.

Healing (spectra.data.heal) trains only what a factorization stores in float: low-rank
factors (`lowrank`), joint's shared projection and per-member factors, LoSparse's
factors and its sparse values on their fixed support, MPO cores (and the input scaling
of the calibrated form), CALDERA's L and R. Everything else stays frozen: the
backbone Q of CALDERA, `quant` codes, `prune` masks and values, biases, and every
module the plan left dense.

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

import dataclasses

from torch import nn
from torch.nn.utils import parametrize

from compressors import factors
from compressors.caldera import Caldera, Plain
from compressors.factors import QuantizedFactor
from compressors.joint import JointGroup
from compressors.losparse import LowRankSparse
from compressors.lowrank import LowRank
from compressors.mpo import MPO
from compressors.quant import Quantized, round_to_nearest
from compressors.sparse import TrainableSparseLinear

HEALABLE = (LowRank, JointGroup, LowRankSparse, MPO, Caldera)


class Trainable:
    """Training form of a compressed model's compact modules (see the module doc)."""

    def __init__(self, model: nn.Module, factorizations: dict, ste: bool = False):
        self.model = model
        self.factorizations = dict(factorizations)
        self._requantize: dict[int, dict[str, Quantized]] = {}  # id(f) -> {side: old}
        model.requires_grad_(False)
        groups: dict[int, list[str]] = {}
        for name, f in self.factorizations.items():
            if isinstance(f, HEALABLE):
                groups.setdefault(id(f), []).append(name)
        self.groups = {names[0]: names for names in groups.values()}
        for names in self.groups.values():
            f = self.factorizations[names[0]]
            self._float_factors(f)
            modules = self._install(names, f, train=True)
            if ste and id(f) in self._requantize:
                _through_grid(modules, self._grids(f))

    def _float_factors(self, f) -> None:
        """Quantized factors of `f` replaced by their float values (kept to requantize)."""
        old = {}
        for field in dataclasses.fields(f):
            part = getattr(f, field.name)
            if isinstance(f, Caldera) and isinstance(part, Quantized) and field.name in ("l", "r"):
                old[(field.name, None)] = part
                setattr(f, field.name, Plain(part.to_dense().to(part.scales.dtype).contiguous()))
            elif isinstance(part, QuantizedFactor):
                old[(field.name, None)] = part
                setattr(f, field.name, part.to_dense().contiguous())
            elif isinstance(part, list):
                for i, x in enumerate(part):
                    if isinstance(x, QuantizedFactor):
                        old[(field.name, i)] = x
                        part[i] = x.to_dense().contiguous()
        if old:
            self._requantize[id(f)] = old

    def _grids(self, f) -> dict[int, object]:
        """{data_ptr of a float factor of `f`: the grid it goes back to}."""
        out = {}
        for (name, i), old in self._requantize.get(id(f), {}).items():
            part = getattr(f, name) if i is None else getattr(f, name)[i]
            out[(part.value if isinstance(part, Plain) else part).data_ptr()] = old
        return out

    def _install(self, names: list[str], f, train: bool) -> list[nn.Module]:
        biases = [self.model.get_submodule(n).bias for n in names]
        biases = [None if b is None else b.detach() for b in biases]
        if isinstance(f, JointGroup):
            modules = f.member_modules(biases)
        else:
            modules = [f.as_module(biases[0])]
        for name, module in zip(names, modules, strict=True):
            if train:
                _train(module, f)
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
        for names in self.groups.values():
            f = self.factorizations[names[0]]
            for (name, i), old in self._requantize.pop(id(f), {}).items():
                if isinstance(old, Quantized):  # CALDERA's L or R, on its grid's settings
                    setattr(f, name, on_grid(getattr(f, name).value.detach(), old))
                elif i is None:
                    setattr(f, name, on_grid(getattr(f, name).detach(), old))
                else:
                    getattr(f, name)[i] = on_grid(getattr(f, name)[i].detach(), old)
            self._install(names, f, train=False)
        self.model.requires_grad_(False)
        return self.factorizations


def on_grid(value, old):
    """`value` quantized again on the grid of `old` (a QuantizedFactor, or CALDERA's
    Quantized L or R): same bits, groups and symmetry, round-to-nearest."""
    if isinstance(old, Quantized):
        return round_to_nearest(
            value.to(old.scales.dtype), old.nbits, old.group_size, old.symmetric
        )
    return factors.requantize(value, old)


class _ThroughGrid(nn.Module):
    """A parametrization: the value on its grid forward, the identity backward."""

    def __init__(self, old):
        super().__init__()
        self.old = old

    def forward(self, x):
        q = on_grid(x.detach(), self.old).to_dense().reshape(x.shape).to(x.dtype)
        return x + (q - x).detach()


def _through_grid(modules: list[nn.Module], grids: dict[int, object]) -> None:
    """Parametrize every trainable tensor of `modules` that is a quantized factor."""
    for module in modules:
        for pname, p in list(module.named_parameters(remove_duplicate=False)):
            old = grids.get(p.data_ptr()) if p.requires_grad else None
            if old is None or ".parametrizations." in f".{pname}":
                continue
            owner, _, attr = pname.rpartition(".")
            target = module.get_submodule(owner) if owner else module
            parametrize.register_parametrization(target, attr, _ThroughGrid(old))


def _train(module: nn.Module, f) -> None:
    """Give `module` (built from healable `f`) its training form, in place."""
    if isinstance(f, LowRankSparse):
        module.low.requires_grad_(True)
        if module.sparse is not None:
            module.sparse = TrainableSparseLinear(f.s)
        else:
            values = module.row_values
            del module.row_values
            module.row_values = nn.Parameter(values)
        return
    for pname, p in module.named_parameters():
        if pname != "bias" and not pname.endswith(".bias"):
            p.requires_grad_(True)
