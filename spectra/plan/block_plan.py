"""A plan's block-scope settings (width): the decoder blocks they name and the shapes
their linear modules take.

A rule or `layers` entry whose method has block scope (compressors.method.Method.scope)
targets decoder blocks by their module name (`model.layers.3`, or
`re:model\\.layers\\.\\d+`), never a linear module. Each module of such a block keeps
its own module-scope setting (quant, say), costed and applied on the shape the block's
setting leaves it: `Entry.shape_after`, (0, 0) when the block's setting removes it.
"""

from __future__ import annotations

from spectra.io.roles import block_prefix

MLP_ROLES = ("gate", "up", "down")
ATTN_ROLES = ("q", "k", "v", "o")


def heads_of(config) -> tuple[int, int] | None:
    """(attention heads, key/value heads) of a model config (a dict or a transformers
    config; a multimodal config's text part), None when it names none."""
    if not isinstance(config, dict):
        config = config.get_text_config().to_dict()
    config = config.get("text_config") or config
    n = config.get("num_attention_heads") or config.get("n_head")
    if not n:
        return None
    return int(n), int(config.get("num_key_value_heads") or n)


def blocks(modules) -> dict[str, list]:
    """{block name: its modules}, in the model's order."""
    out: dict[str, list] = {}
    for m in modules:
        name = block_prefix(m.name) if m.block is not None else None
        if name is not None:
            out.setdefault(name, []).append(m)
    return out


def assign(plan, entries, heads, error) -> None:
    """Set each entry's block setting (`width`, `width_source`) from `plan`'s block-scope
    rules and layers, then `shape_after`; `error(message)` raises the plan's error."""
    from compressors.registry import is_block_config  # deferred: torch

    by_block = blocks(entries)
    for name, config in plan.layers.items():
        if is_block_config(config) and name not in by_block:
            error(f"layers.{name}: no decoder block of this model is named so")
    rules = [r for r in plan.rules if is_block_config(r.config)]
    used = {r.where: 0 for r in rules}
    chosen = {}
    for name in by_block:
        if name in plan.layers and is_block_config(plan.layers[name]):
            chosen[name] = ("layers", plan.layers[name])
            continue
        rule = next((r for r in rules if r.matches(name)), None)
        if rule is not None:
            chosen[name] = (rule.where, rule.config)
            used[rule.where] += 1
    for where, count in used.items():
        if count == 0:
            rule = next(r for r in rules if r.where == where)
            error(f"{where}.targets: {[p.text for p in rule.targets]} match no decoder block")
    if by_block and all(n in chosen and chosen[n][1].skip == "block" for n in by_block):
        error(f"{next(iter(by_block))}: width skip=block on every block leaves no model")
    for e in entries:
        e.shape_after = tuple(e.shape)
    for name, (source, config) in chosen.items():
        members = by_block[name]
        for e in members:
            e.width, e.width_source = config, source
        _shapes(name, config, members, heads, error)


def _shapes(block: str, config, members, heads, error) -> None:
    roles = {e.role: e for e in members}
    gone = {"block": (*MLP_ROLES, *ATTN_ROLES), "attention": ATTN_ROLES, "mlp": MLP_ROLES}
    removed = gone.get(config.skip, ())
    if config.ffn is not None and "mlp" != config.skip != "block":
        if not all(r in roles for r in MLP_ROLES):
            error(f"{block}: width ffn needs a gated MLP (gate, up and down projections)")
        full = roles["down"].shape[1]
        if not 1 <= config.ffn <= full:
            error(f"{block}: width ffn={config.ffn} must be between 1 and the MLP's {full}")
        roles["gate"].shape_after = (config.ffn, roles["gate"].shape[1])
        roles["up"].shape_after = (config.ffn, roles["up"].shape[1])
        roles["down"].shape_after = (roles["down"].shape[0], config.ffn)
    if config.kv_heads is not None and "attention" != config.skip != "block":
        if not all(r in roles for r in ATTN_ROLES):
            error(f"{block}: width kv_heads needs separate q, k, v and o projections")
        if heads is None:
            error(f"{block}: width kv_heads needs the model's attention head counts")
        n_kv = heads[1]
        if config.kv_heads > n_kv or n_kv % config.kv_heads:
            error(
                f"{block}: width kv_heads={config.kv_heads} must divide the block's "
                f"{n_kv} key/value heads"
            )
        for r in ("k", "v"):
            rows, cols = roles[r].shape
            roles[r].shape_after = (rows // n_kv * config.kv_heads, cols)
    for e in members:
        if e.role in removed:
            e.shape_after = (0, 0)
