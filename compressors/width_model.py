"""Width applied to a transformers decoder (Llama-like: mlp.gate/up/down_proj,
self_attn.q/k/v/o_proj, grouped-query attention reading `num_key_value_groups`).

`shrink(model, settings, grams)` narrows the blocks in place: smaller Linear modules,
each attention's key/value grouping set per block, skipped blocks removed (the later
blocks renumbered). When every block ends with one MLP width and one key/value head
count, `plain_config(model)` writes them into the model's own config, so that
`save_pretrained` is a checkpoint of the original architecture that every engine loads
as it is (`from_pretrained`, no remote code).
"""

from __future__ import annotations

import torch
from torch import nn

from compressors.base import config_error
from compressors.blocks import decoder_layers, layers_name
from compressors.width import WidthConfig, merge_kv_heads, shrink_mlp

MLP = ("gate_proj", "up_proj", "down_proj")
ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")


def _linear(weight: torch.Tensor, bias: torch.Tensor | None, like: nn.Linear) -> nn.Linear:
    """An nn.Linear holding `weight` (out, in) and `bias`, in `like`'s dtype and device."""
    out = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    out = out.to(like.weight.device, like.weight.dtype)
    with torch.no_grad():
        out.weight.copy_(weight)
        if bias is not None:
            out.bias.copy_(bias)
    out.weight.requires_grad_(False)
    return out


def _check(layer: nn.Module, index: int) -> None:
    mlp, attn = getattr(layer, "mlp", None), getattr(layer, "self_attn", None)
    if mlp is None or not all(isinstance(getattr(mlp, n, None), nn.Linear) for n in MLP):
        raise config_error("width", "block", index, "needs a gated MLP (gate, up, down_proj)")
    if attn is None or not all(isinstance(getattr(attn, n, None), nn.Linear) for n in ATTN):
        raise config_error(
            "width", "block", index, "needs separate q, k, v, o projections in its attention"
        )


def shrink(model: nn.Module, settings: dict[int, WidthConfig], grams=None) -> dict[int, dict]:
    """Narrow `model`'s blocks in place; returns {block: {"ffn", "kv_heads"} kept, or
    {"skip": "block"}}. `grams`: {block: {module name: (H, rows)}} of the calibration
    (the MLP's choice reads down_proj's, the head merge q_proj's)."""
    layers, prefix = decoder_layers(model), layers_name(model)
    cfg = model.config.get_text_config()
    n_heads, n_kv = cfg.num_attention_heads, getattr(cfg, "num_key_value_heads", None)
    n_kv = n_kv or n_heads
    if sum(s.skip == "block" for s in settings.values()) >= len(layers):
        raise config_error("width", "skip", "block", "would remove every block of the model")
    out: dict[int, dict] = {}
    for index, config in sorted(settings.items()):
        if not 0 <= index < len(layers):
            raise config_error("width", "block", index, f"the model has {len(layers)} blocks")
        layer = layers[index]
        _check(layer, index)
        if config.skip == "block":
            out[index] = {"skip": "block"}
            continue
        block = (grams or {}).get(index, {})
        name = f"{prefix}.{index}"
        h_down = block.get(f"{name}.mlp.down_proj", (None,))[0]
        h_attn = block.get(f"{name}.self_attn.q_proj", (None,))[0]
        mlp, attn = layer.mlp, layer.self_attn
        if config.ffn is not None and config.ffn != mlp.down_proj.weight.shape[1]:
            gate, up, down, keep = shrink_mlp(
                mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight, config.ffn,
                h_down, config.select,
            )  # fmt: skip
            for attr, w in zip(MLP, (gate, up, down), strict=True):
                old = getattr(mlp, attr)
                bias = None if old.bias is None else old.bias.detach()
                if bias is not None and attr != "down_proj":
                    bias = bias[keep]
                setattr(mlp, attr, _linear(w, bias, old))
        kv = attn.k_proj.weight.shape[0] // attn.head_dim
        if config.kv_heads is not None and config.kv_heads != kv:
            if config.select == "greedy" and h_attn is None:
                raise config_error("width", "kv_heads", config.kv_heads, "needs calibration data")
            biases = {k[0]: getattr(attn, k).bias for k in ATTN[:3]}
            q, k, v, o, b, _ = merge_kv_heads(
                *(getattr(attn, a).weight for a in ATTN), n_heads, kv, config.kv_heads,
                h_attn if config.select == "greedy" else None, biases,
            )  # fmt: skip
            for attr, w in zip(ATTN, (q, k, v, o), strict=True):
                old = getattr(attn, attr)
                bias = b.get(attr[0]) if attr != "o_proj" else old.bias
                setattr(attn, attr, _linear(w, None if bias is None else bias.detach(), old))
            attn.num_key_value_groups = n_heads // config.kv_heads
        out[index] = {
            "ffn": layer.mlp.down_proj.weight.shape[1],
            "kv_heads": layer.self_attn.k_proj.weight.shape[0] // layer.self_attn.head_dim,
        }
    gone = {i for i, s in out.items() if s.get("skip") == "block"}
    if gone:
        kept = [layer for i, layer in enumerate(layers) if i not in gone]
        for i in sorted(gone, reverse=True):
            del layers[i]  # nn.ModuleList renumbers the rest
        for i, layer in enumerate(kept):
            layer.self_attn.layer_idx = i
        types = getattr(cfg, "layer_types", None)
        if types is not None:
            cfg.layer_types = [t for i, t in enumerate(types) if i not in gone]
        cfg.num_hidden_layers = len(kept)
    return out


def widths(model: nn.Module) -> list[tuple[int, int]]:
    """(MLP width, key/value heads) of every block, in order."""
    return [
        (
            layer.mlp.down_proj.weight.shape[1],
            layer.self_attn.k_proj.weight.shape[0] // layer.self_attn.head_dim,
        )
        for layer in decoder_layers(model)
    ]


def plain_config(model: nn.Module) -> bool:
    """Write the blocks' one MLP width and key/value head count into the model's config
    (True), or leave it (False: the blocks differ, a per-block export is needed)."""
    got = set(widths(model))
    if len(got) != 1:
        return False
    (ffn, kv), cfg = got.pop(), model.config.get_text_config()
    cfg.intermediate_size, cfg.num_key_value_heads = ffn, kv
    return True
