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


class LowRankSparseLinear(LowRankLinear):
    """y = x (A B + S)^T + bias, S sparse: its nonzeros in CSR (`s_crow`, `s_col`,
    `s_values`), or whole rows (`rows`, `row_values`)."""

    def __init__(self, in_features, out_features, rank, bias, dtype=None, nnz=0, rows=None):
        super().__init__(in_features, out_features, rank, bias, dtype)
        self.by_rows = rows is not None
        if self.by_rows:
            self.register_buffer("rows", torch.empty(rows, dtype=torch.int64))
            self.row_values = nn.Parameter(torch.empty(rows, in_features, dtype=dtype))
        else:
            self.register_buffer("s_crow", torch.empty(out_features + 1, dtype=torch.int32))
            self.register_buffer("s_col", torch.empty(nnz, dtype=torch.int32))
            self.s_values = nn.Parameter(torch.empty(nnz, dtype=dtype))

    def forward(self, x):
        y = nn.functional.linear(nn.functional.linear(x, self.b), self.a)
        if self.by_rows:
            y = y.index_add(-1, self.rows, nn.functional.linear(x, self.row_values))
        else:
            shape = (self.out_features, self.in_features)
            s = torch.sparse_csr_tensor(self.s_crow, self.s_col, self.s_values, shape)
            flat = x.reshape(-1, self.in_features)
            y = y + (s @ flat.T).T.reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


class MPOLinear(nn.Module):
    """y = x (W diag(scale))^T + bias with W the contraction of `core0`, `core1`, ...
    (r, m_k, n_k, r'): W[(i_1..i_K), (j_1..j_K)] = G_1[i_1, j_1] ... G_K[i_K, j_K]."""

    def __init__(self, in_features, out_features, cores, bias, dtype=None, scale=False):
        super().__init__()
        self.in_features, self.out_features, self.k = in_features, out_features, len(cores)
        for i, shape in enumerate(cores):
            setattr(self, f"core{{i}}", nn.Parameter(torch.empty(*shape, dtype=dtype)))
        self.scale = nn.Parameter(torch.empty(in_features, dtype=dtype)) if scale else None
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype)) if bias else None

    def forward(self, x):
        lead = x.shape[:-1]
        if self.scale is not None:
            x = x * self.scale
        t = x.reshape(-1, 1, 1, self.in_features)  # (tokens, rows done, bond, columns left)
        for i in range(self.k):
            core = getattr(self, f"core{{i}}")  # (r, m, n, r')
            b, done, r, left = t.shape
            n = core.shape[2]
            t = t.reshape(b, done, r, n, left // n)
            t = torch.einsum("bdrnl,rmns->bdmsl", t, core)
            t = t.reshape(b, done * core.shape[1], core.shape[3], left // n)
        y = t.reshape(*lead, self.out_features)
        return y if self.bias is None else y + self.bias


class Removed(nn.Module):
    """A sublayer that width took out: its residual branch adds nothing."""

    def __init__(self, kind):
        super().__init__()
        self.kind = kind

    def forward(self, hidden_states, *args, **kwargs):
        out = torch.zeros_like(hidden_states)
        return (out, None) if self.kind == "attention" else out


def narrowed(old, out_features, in_features):
    """An nn.Linear like `old` (bias, dtype) of another shape."""
    dtype = old.weight.dtype
    return nn.Linear(in_features, out_features, bias=old.bias is not None, dtype=dtype)


def set_widths(model, blocks):
    """Each block's MLP width and key/value heads as `config.spectra_blocks` lists them
    (0: the sublayer removed)."""
    heads = model.config.num_attention_heads
    for layer, want in zip(model.model.layers, blocks):
        ffn, kv = want["ffn"], want["kv_heads"]
        mlp, attn = layer.mlp, layer.self_attn
        if ffn == 0:
            layer.mlp = Removed("mlp")
        elif ffn != mlp.down_proj.in_features:
            mlp.gate_proj = narrowed(mlp.gate_proj, ffn, mlp.gate_proj.in_features)
            mlp.up_proj = narrowed(mlp.up_proj, ffn, mlp.up_proj.in_features)
            mlp.down_proj = narrowed(mlp.down_proj, mlp.down_proj.out_features, ffn)
        if kv == 0:
            layer.self_attn = Removed("attention")
        elif kv * attn.head_dim != attn.k_proj.out_features:
            attn.k_proj = narrowed(attn.k_proj, kv * attn.head_dim, attn.k_proj.in_features)
            attn.v_proj = narrowed(attn.v_proj, kv * attn.head_dim, attn.v_proj.in_features)
            attn.num_key_value_groups = heads // kv


class Spectra{base}({base}):
    """{base} with each block's widths as `config.spectra_blocks` lists them, and the
    modules `config.spectra_compact` names in their compact forms."""

    def __init__(self, config):
        super().__init__(config)
        blocks = getattr(config, "spectra_blocks", None)
        if blocks:
            set_widths(self, blocks)
        for name, spec in (getattr(config, "spectra_compact", None) or {{}}).items():
            parent, _, child = name.rpartition(".")
            owner = self.get_submodule(parent) if parent else self
            old = getattr(owner, child)
            out_features, in_features = old.weight.shape
            if type(old).__name__ == "Conv1D":  # GPT-2 stores (in, out)
                in_features, out_features = old.weight.shape
            dims = (in_features, out_features)
            bias, dtype = old.bias is not None, old.weight.dtype
            if spec["kind"] == "lowrank":
                new = LowRankLinear(*dims, spec["rank"], bias, dtype)
            elif spec["kind"] == "losparse":
                extra = dict(nnz=spec.get("nnz", 0), rows=spec.get("rows"))
                new = LowRankSparseLinear(*dims, spec["rank"], bias, dtype, **extra)
            elif spec["kind"] == "mpo":
                new = MPOLinear(*dims, spec["cores"], bias, dtype, spec["scale"])
            else:
                raise ValueError(f"{{name}}: unknown compact kind {{spec['kind']!r}}")
            setattr(owner, child, new)
'''


# a per-block width export on these architectures is also DeciLM's (vLLM's nemotron_nas):
# the configuration class below turns `block_configs`' dicts into the objects it reads
DECI_BASES = {"llama": {}, "mistral": {}, "qwen2": {"qkv_bias": True}}
DECI = '''

from transformers import {config}


class DeciPart:
    """A sublayer's entry in a `block_configs` item (no_op, n_heads_in_group,
    intermediate_size), as attributes: how vLLM's nemotron_nas reads them."""

    def __init__(self, **fields):
        self.__dict__.update(fields)

    def to_dict(self):
        return dict(self.__dict__)


class DeciBlock:
    """One decoder block's `block_configs` item: its attention and ffn parts."""

    def __init__(self, attention, ffn, **extra):
        self.attention = attention if isinstance(attention, DeciPart) else DeciPart(**attention)
        self.ffn = ffn if isinstance(ffn, DeciPart) else DeciPart(**ffn)

    def to_dict(self):
        return {{"attention": self.attention.to_dict(), "ffn": self.ffn.to_dict()}}


class SpectraDeciConfig({config}):
    """{config} with DeciLM's per-block `block_configs` (model_type nemotron-nas)."""

    model_type = "nemotron-nas"

    def __post_init__(self, **kwargs):
        blocks = kwargs.pop("block_configs", None)
        super().__post_init__(**kwargs)
        self.block_configs = [DeciBlock(**b) if isinstance(b, dict) else b for b in blocks or []]

    def to_dict(self):
        out = super().to_dict()
        blocks = getattr(self, "block_configs", None) or []
        out["block_configs"] = [b.to_dict() if hasattr(b, "to_dict") else b for b in blocks]
        return out


_base_widths = set_widths


def set_widths(model, blocks):
    """As above, and a removed sublayer's norm gone too (a pre-norm block: the norm
    feeds only that sublayer; DeciLM's checkpoints have none there)."""
    _base_widths(model, blocks)
    for layer, want in zip(model.model.layers, blocks):
        if want["ffn"] == 0:
            layer.post_attention_layernorm = nn.Identity()
        if want["kv_heads"] == 0:
            layer.input_layernorm = nn.Identity()


Spectra{base}.config_class = SpectraDeciConfig
'''


def modeling(base: str, deci_config: str | None = None) -> str:
    """The modeling file for the `base` architecture (with DeciLM's configuration class
    on `deci_config`, the base's own configuration class, for a per-block export)."""
    code = TEMPLATE.format(base=base)
    return code + DECI.format(base=base, config=deci_config) if deci_config else code


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
        base = c.get("spectra_base") or c["architectures"][0].removeprefix("Spectra")
        ours = code.read_text() == modeling(base, c.get("spectra_base_config"))
    except (OSError, KeyError, IndexError, TypeError, AttributeError):
        ours = False
    if not ours:
        raise SpectraInputError(
            f"{root}: its {MODELING} is not the one spectra writes; refusing to run it"
        )
    return True


def trusted(root: Path) -> dict:
    """transformers' loading arguments for `root`: trust_remote_code for an export whose
    modeling file is spectra's (a DeciLM config needs its configuration class even to
    read the tokenizer), nothing otherwise."""
    return {"trust_remote_code": True} if is_ours(root) else {}
