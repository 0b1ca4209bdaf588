"""The linear modules of a model as plans see them: name, (out, in) shape, role, block."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from spectra.io import roles


@dataclass
class Target:
    """A linear module as the plan sees it: name, (out, in) shape, role, block."""

    name: str
    shape: tuple[int, int]
    role: str
    block: int | None
    conv1d: bool

    def weight(self, module) -> torch.Tensor:
        w = module.weight.detach()
        return w.T if self.conv1d else w


def is_conv1d(module) -> bool:
    """Whether `module` is GPT-2's Conv1D, which stores its weight (in, out)."""
    from transformers.pytorch_utils import Conv1D  # deferred: only models import it

    return isinstance(module, Conv1D)


def linear_targets(model) -> dict[str, tuple[Target, nn.Module]]:
    """Every nn.Linear / Conv1D of the model with its (out, in) shape and tags."""
    out = {}
    # a tied lm_head is the embedding matrix: compressing it would untie the two (the
    # same parameter, or the same memory; a skeleton's meta parameters have none)
    embeds = [m.weight for m in model.modules() if isinstance(m, nn.Embedding)]
    tied = {id(w) for w in embeds} | {w.data_ptr() for w in embeds if not w.is_meta}

    def is_tied(w) -> bool:
        return id(w) in tied or (not w.is_meta and w.data_ptr() in tied)

    for name, mod in model.named_modules():
        conv1d = is_conv1d(mod)
        if (isinstance(mod, nn.Linear) or conv1d) and not is_tied(mod.weight):
            shape = tuple(mod.weight.shape[::-1] if conv1d else mod.weight.shape)
            out[name] = (
                Target(name, shape, roles.role_of(name), roles.block_of(name), conv1d),
                mod,
            )
    return out
