"""The modeling file `spectra export --format hf` ships beside a compact checkpoint, and
whether a directory's is that file (then, and only then, spectra loads it with
transformers' trust_remote_code: the code run is the code written here)."""

from __future__ import annotations

import json
from pathlib import Path

from spectra.errors import SpectraInputError

MODELING = "spectra_modeling.py"

TEMPLATE = '''"""Spectra's compact modules on {base}, for transformers' trust_remote_code.

Written by `spectra export --format hf`; imports only torch and transformers.
"""

import torch
from torch import nn
from transformers import {base}


class LowRankLinear(nn.Module):
    """y = (x B^T) A^T + bias: a factorized Linear, its (out, in) matrix never formed."""

    def __init__(self, in_features, out_features, rank, bias, dtype=None):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.a = nn.Parameter(torch.empty(out_features, rank, dtype=dtype))
        self.b = nn.Parameter(torch.empty(rank, in_features, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype)) if bias else None

    def forward(self, x):
        return nn.functional.linear(nn.functional.linear(x, self.b), self.a, self.bias)


class Spectra{base}({base}):
    """{base} with the modules `config.spectra_compact` names factorized."""

    def __init__(self, config):
        super().__init__(config)
        for name, spec in (getattr(config, "spectra_compact", None) or {{}}).items():
            parent, _, child = name.rpartition(".")
            owner = self.get_submodule(parent) if parent else self
            old = getattr(owner, child)
            out_features, in_features = old.weight.shape
            if type(old).__name__ == "Conv1D":  # GPT-2 stores (in, out)
                in_features, out_features = old.weight.shape
            new = LowRankLinear(
                in_features,
                out_features,
                spec["rank"],
                old.bias is not None,
                old.weight.dtype,
            )
            setattr(owner, child, new)
'''


def is_ours(root: Path) -> bool:
    """Whether `root` is a compact hf export (False for any other checkpoint); one whose
    modeling file is not exactly ours is refused, never run."""
    config, code = Path(root) / "config.json", Path(root) / MODELING
    try:
        c = json.loads(config.read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(c, dict) or "spectra_compact" not in c:
        return False
    try:
        base = c["architectures"][0].removeprefix("Spectra")
        ours = code.read_text() == TEMPLATE.format(base=base)
    except (OSError, KeyError, IndexError, TypeError, AttributeError):
        ours = False
    if not ours:
        raise SpectraInputError(
            f"{root}: its {MODELING} is not the one spectra writes; refusing to run it"
        )
    return True
