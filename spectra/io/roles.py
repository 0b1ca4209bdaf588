"""Role and block tags from parameter names, for plots and plan rules.

Covers Llama/Mistral/Qwen2/Gemma, GPT-2 (Conv1D), OPT and Phi (1/2 and 3) names.
Fused matrices keep their own roles (`qkv`, `gate_up`) rather than being mislabelled.
"""

from __future__ import annotations

import re

ROLES = ("embed", "q", "k", "v", "qkv", "o", "gate", "up", "gate_up", "down", "lm_head", "other")

# first match wins; searched against the module name (parameter name without ".weight")
_ROLE_PATTERNS = [
    ("lm_head", r"(^|\.)(lm_head|embed_out)$"),
    ("embed", r"(^|\.)(embed_tokens|embed_positions|wte|wpe|word_embeddings|tok_embeddings)$"),
    ("qkv", r"(^|\.)(c_attn|qkv_proj|query_key_value|Wqkv)$"),
    ("gate_up", r"(^|\.)gate_up_proj$"),
    ("q", r"(^|\.)(q_proj|query|wq)$"),
    ("k", r"(^|\.)(k_proj|key|wk)$"),
    ("v", r"(^|\.)(v_proj|value|wv)$"),
    ("o", r"(^|\.)(o_proj|out_proj|wo|attn\.c_proj|self_attn\.dense|attention\.dense)$"),
    ("gate", r"(^|\.)(gate_proj|w1)$"),
    ("up", r"(^|\.)(up_proj|c_fc|fc1|w3|dense_h_to_4h)$"),
    ("down", r"(^|\.)(down_proj|mlp\.c_proj|fc2|w2|dense_4h_to_h)$"),
]
_ROLE_RES = [(role, re.compile(p)) for role, p in _ROLE_PATTERNS]
_BLOCK_RE = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.")
# GPT-2 style Conv1D stores (in, out); everything else stores (out, in)
_CONV1D_RE = re.compile(r"(^|\.)(c_attn|c_proj|c_fc)$")
CONV1D_MODEL_TYPES = {"gpt2", "gpt_bigcode", "imagegpt", "decision_transformer"}


def module_name(param_name: str) -> str:
    """`model.layers.0.mlp.up_proj.weight` -> `model.layers.0.mlp.up_proj`."""
    return param_name.removesuffix(".weight")


def role_of(name: str) -> str:
    """Role tag of a module name, `other` when no pattern matches."""
    for role, rx in _ROLE_RES:
        if rx.search(name):
            return role
    return "other"


def block_prefix(name: str) -> str | None:
    """The decoder block's own module name within a module name (model.layers.3 of
    model.layers.3.mlp.up_proj), None outside the blocks."""
    m = _BLOCK_RE.search(name)
    return name[: m.end() - 1] if m else None


def block_of(name: str) -> int | None:
    """Transformer block index of a module name, None outside the blocks."""
    m = _BLOCK_RE.search(name)
    return int(m.group(1)) if m else None


def is_conv1d(name: str, model_type: str | None) -> bool:
    """True when the stored weight is (in, out) and must be transposed to (out, in)."""
    if model_type is not None and model_type not in CONV1D_MODEL_TYPES:
        return False
    return bool(_CONV1D_RE.search(name))
