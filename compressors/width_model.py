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
    if mlp is None or not (
        removed(mlp) or all(isinstance(getattr(mlp, n, None), nn.Linear) for n in MLP)
    ):
        raise config_error("width", "block", index, "needs a gated MLP (gate, up, down_proj)")
    if attn is None or not (
        removed(attn) or all(isinstance(getattr(attn, n, None), nn.Linear) for n in ATTN)
    ):
        raise config_error(
            "width", "block", index, "needs separate q, k, v, o projections in its attention"
        )


class Removed(nn.Module):
    """A sublayer taken out (`skip`): its residual branch adds nothing. An attention's
    stand-in answers (zeros, None) as transformers' attention modules do."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind  # "attention" or "mlp"

    def forward(self, hidden_states, *args, **kwargs):
        out = torch.zeros_like(hidden_states)
        return (out, None) if self.kind == "attention" else out


def removed(module) -> bool:
    return isinstance(module, Removed)


def shrink(model: nn.Module, settings: dict[int, WidthConfig], grams=None) -> dict[int, dict]:
    """Narrow `model`'s blocks in place, skipped blocks dropped (the rest renumbered);
    returns {block: {"ffn", "kv_heads"} kept, or {"skip": "block"}}. `grams`:
    {block: {module name: (H, rows)}} of the calibration (the MLP's choice reads
    down_proj's, the head merge q_proj's)."""
    layers = decoder_layers(model)
    if sum(s.skip == "block" for s in settings.values()) >= len(layers):
        raise config_error("width", "skip", "block", "would remove every block of the model")
    out: dict[int, dict] = {}
    for index, config in sorted(settings.items()):
        if not 0 <= index < len(layers):
            raise config_error("width", "block", index, f"the model has {len(layers)} blocks")
        shrink_block(model, index, config, (grams or {}).get(index, {}))
        if config.skip == "block":
            out[index] = {"skip": "block"}
        else:
            ffn, kv = structure_of(layers[index])
            out[index] = {"ffn": ffn, "kv_heads": kv}
    drop_skipped(model)
    return out


def shrink_block(model: nn.Module, index: int, config: WidthConfig, grams: dict) -> dict:
    """Narrow block `index` of `model` in place by `config`, reading the block's
    calibration `grams` ({module name: (H, rows)}); a skipped sublayer becomes `Removed`.
    Returns what a later method on the block's new modules needs: {"keep": the MLP's
    kept neurons, "q_heads": o_proj's input heads in their new order} (None: unchanged)."""
    layer, name = decoder_layers(model)[index], f"{layers_name(model)}.{index}"
    _check(layer, index)
    info: dict = {"keep": None, "q_heads": None}
    if config.skip in ("attention", "block"):
        layer.self_attn = Removed("attention")
    if config.skip in ("mlp", "block"):
        layer.mlp = Removed("mlp")
    info = _narrow(model, layer, name, config, grams, info)
    layer.width_kept = structure_of(layer)  # what OUT records, whatever replaces its modules
    return info


def _narrow(model, layer, name: str, config: WidthConfig, grams: dict, info: dict) -> dict:
    mlp, attn = layer.mlp, layer.self_attn
    if not removed(mlp) and config.ffn is not None and config.ffn != mlp.down_proj.in_features:
        h_down = grams.get(f"{name}.mlp.down_proj", (None,))[0]
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
        info["keep"] = keep
    if removed(attn) or config.kv_heads is None:
        return info
    cfg = model.config.get_text_config()
    n_heads, kv = cfg.num_attention_heads, attn.k_proj.out_features // attn.head_dim
    if config.kv_heads == kv:
        return info
    h_attn = grams.get(f"{name}.self_attn.q_proj", (None,))[0]
    if config.select == "greedy" and h_attn is None:
        raise config_error("width", "kv_heads", config.kv_heads, "needs calibration data")
    biases = {k[0]: getattr(attn, k).bias for k in ATTN[:3]}
    q, k, v, o, b, sets = merge_kv_heads(
        *(getattr(attn, a).weight for a in ATTN), n_heads, kv, config.kv_heads,
        h_attn if config.select == "greedy" else None, biases,
    )  # fmt: skip
    for attr, w in zip(ATTN, (q, k, v, o), strict=True):
        old = getattr(attn, attr)
        bias = b.get(attr[0]) if attr != "o_proj" else old.bias
        setattr(attn, attr, _linear(w, None if bias is None else bias.detach(), old))
    attn.num_key_value_groups = n_heads // config.kv_heads
    per = n_heads // kv
    info["q_heads"] = [i * per + j for group in sets for i in group for j in range(per)]
    return info


def structure_of(layer: nn.Module) -> tuple[int, int]:
    """(MLP width, key/value heads) of a block; 0 for a removed sublayer."""
    mlp, attn = layer.mlp, layer.self_attn
    ffn = 0 if removed(mlp) else mlp.down_proj.in_features
    kv = 0 if removed(attn) else attn.k_proj.out_features // attn.head_dim
    return ffn, kv


def structure(model: nn.Module) -> list[dict] | None:
    """Every block's {"ffn", "kv_heads"} (0: the sublayer removed) when any block differs
    from the model's config, else None: what a saved OUT records so that its skeleton
    can be rebuilt (`restructure`)."""
    full, got = _full(model), widths(model)
    if all(g == full for g in got):
        return None
    return [{"ffn": f, "kv_heads": k} for f, k in got]


def restructure(model: nn.Module, blocks: list[dict]) -> None:
    """Give a model built from its config the block shapes `structure` recorded: empty
    modules of the recorded sizes (on the model's device, meta included), `Removed`
    sublayers, each attention's key/value grouping."""
    layers = decoder_layers(model)
    if len(blocks) != len(layers):
        raise ValueError(f"{len(blocks)} block shapes recorded for {len(layers)} blocks")
    n_heads = model.config.get_text_config().num_attention_heads
    for layer, want in zip(layers, blocks, strict=True):
        ffn, kv = int(want["ffn"]), int(want["kv_heads"])
        layer.width_kept = (ffn, kv)
        if ffn == 0:
            layer.mlp = Removed("mlp")
        elif ffn != layer.mlp.down_proj.in_features:
            for attr in MLP:
                old = getattr(layer.mlp, attr)
                shape = (old.out_features, ffn) if attr == "down_proj" else (ffn, old.in_features)
                setattr(layer.mlp, attr, _empty(shape, old))
        if kv == 0:
            layer.self_attn = Removed("attention")
            continue
        attn = layer.self_attn
        if kv != attn.k_proj.out_features // attn.head_dim:
            for attr in ("k_proj", "v_proj"):
                old = getattr(attn, attr)
                setattr(attn, attr, _empty((kv * attn.head_dim, old.in_features), old))
            attn.num_key_value_groups = n_heads // kv


def _empty(shape: tuple[int, int], like: nn.Linear) -> nn.Linear:
    """An nn.Linear (out, in) = `shape` like `like` (bias, dtype, device), uninitialised."""
    w = like.weight
    out = nn.Linear(shape[1], shape[0], bias=like.bias is not None, device="meta", dtype=w.dtype)
    return out.to_empty(device=w.device).requires_grad_(False)


def drop_skipped(model: nn.Module) -> list[int]:
    """Take the blocks whose sublayers are both removed out of the model (the later ones
    renumbered, the config's block count and layer types with them); their indices."""
    layers = decoder_layers(model)
    gone = [i for i, layer in enumerate(layers) if removed(layer.mlp) and removed(layer.self_attn)]
    if not gone:
        return gone
    cfg = model.config.get_text_config()
    for i in reversed(gone):
        del layers[i]  # nn.ModuleList renumbers the rest
    for i, layer in enumerate(layers):
        layer.self_attn.layer_idx = i
    types = getattr(cfg, "layer_types", None)
    if types is not None:
        cfg.layer_types = [t for i, t in enumerate(types) if i not in gone]
    cfg.num_hidden_layers = len(layers)
    return gone


def widths(model: nn.Module) -> list[tuple[int, int]]:
    """(MLP width, key/value heads) of every block, in order (0: removed)."""
    full = _full(model)
    return [getattr(layer, "width_kept", full) for layer in decoder_layers(model)]


def _full(model: nn.Module) -> tuple[int, int]:
    """(MLP width, key/value heads) that the model's config gives every block."""
    cfg = model.config.get_text_config()
    kv = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    return cfg.intermediate_size, kv


def plain_config(model: nn.Module) -> bool:
    """Write the blocks' one MLP width and key/value head count into the model's config
    (True), or leave it (False: the blocks differ, a per-block export is needed)."""
    got = set(widths(model))
    if len(got) != 1 or 0 in next(iter(got)):
        return False
    (ffn, kv), cfg = got.pop(), model.config.get_text_config()
    cfg.intermediate_size, cfg.num_key_value_heads = ffn, kv
    return True


def exported(model: nn.Module, factorizations: dict) -> tuple[dict, list[dict] | None]:
    """A narrowed model made ready to be written as a checkpoint, in place: skipped
    blocks dropped (later blocks renumbered, their factorizations' names with them) and,
    when every block is left with one MLP width and one key/value head count and no
    sublayer removed, those written into the config (`plain_config`). Returns
    (factorizations by their new names, every block's {"ffn", "kv_heads"} when the
    blocks still differ: a per-block export; None: a plain checkpoint)."""
    prefix = layers_name(model) + "."
    gone = drop_skipped(model)
    if gone:

        def renamed(name: str) -> str:
            if not name.startswith(prefix):
                return name
            index, _, rest = name[len(prefix) :].partition(".")
            return f"{prefix}{int(index) - sum(g < int(index) for g in gone)}.{rest}"

        factorizations = {renamed(n): f for n, f in factorizations.items()}
    if plain_config(model):
        return factorizations, None
    return factorizations, [{"ffn": f, "kv_heads": k} for f, k in widths(model)]


def kept(names: list[str], blocks: list[dict] | None) -> list[str]:
    """`names` without the norms of the sublayers `blocks` (a per-block export's
    {"ffn", "kv_heads"}, 0: removed) removed: a norm feeds only its sublayer, and the
    engines' per-block layouts (llama.cpp's and vLLM's Deci blocks) have none there."""
    from spectra.io.roles import block_of

    if not blocks:
        return names
    out = []
    for n in names:
        b = block_of(n)
        gone = b is not None and (
            (blocks[b]["kv_heads"] == 0 and "input_layernorm" in n)
            or (blocks[b]["ffn"] == 0 and "post_attention_layernorm" in n)
        )
        if not gone:
            out.append(n)
    return out


def narrowed_grams(model: nn.Module, index: int, info: dict, grams: dict | None) -> dict | None:
    """Block `index`'s calibration Grams for its modules as `shrink_block` left them
    (`info`): down_proj's on the kept neurons (exact: their activations are unchanged),
    o_proj's with its input heads in their new order (the dense attention's output)."""
    if grams is None:
        return None
    grams, prefix = dict(grams), f"{layers_name(model)}.{index}."
    down, o = f"{prefix}mlp.down_proj", f"{prefix}self_attn.o_proj"
    if info["keep"] is not None and down in grams:
        h, rows = grams[down]
        grams[down] = (h[info["keep"]][:, info["keep"]], rows)
    if info["q_heads"] is not None and o in grams:
        d = model.get_submodule(f"{prefix}self_attn").head_dim
        idx = torch.cat([torch.arange(i * d, (i + 1) * d) for i in info["q_heads"]])
        h, rows = grams[o]
        grams[o] = (h[idx][:, idx], rows)
    return grams
