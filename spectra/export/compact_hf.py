"""`--format hf`: a transformers checkpoint that keeps factorized modules factorized.

Each low-rank module (a `lowrank` module, or a member of a `joint` group: its own A_i
beside a copy of the group's shared V) is stored as its two factors, `NAME.a` (out, r)
and `NAME.b` (r, in), and runs as two thin products; a LoSparse module as its factors
and its sparse residual in CSR (or its kept rows); an MPO module as its cores. Every
other module (CALDERA, quant, prune) is stored dense (reconstructed), and the summary
says why. A form that is not smaller than its dense matrix (r (m + n) >= m n for low
rank) is stored dense too.

The directory ships `spectra_modeling.py`, a modeling file of the project's own that
imports only torch and transformers: a subclass of the checkpoint's own architecture
whose constructor puts a `LowRankLinear` in place of each module that `config.json`'s
`spectra_compact` names. `auto_map` points transformers at it, so
`AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)` loads the compact
model; its weights take what the plan says they take.
"""

from __future__ import annotations

from pathlib import Path

import torch

from spectra.io.remote_code import DECI_BASES, MODELING, modeling


def pair(f, member: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(A, B) of a module stored as a product of two factors (a low-rank module, or a
    joint group's member: A_i and the shared V^T), else None."""
    from compressors import factors
    from compressors.joint import JointGroup
    from compressors.lowrank import LowRank

    if isinstance(f, LowRank):
        return factors.dense(f.a), factors.dense(f.b)
    if isinstance(f, JointGroup):
        return factors.dense(f.a[member]), factors.dense(f.v).T
    return None


def form(f, member: int) -> tuple[dict, dict[str, torch.Tensor]] | None:
    """(spec in config.json, {suffix: tensor}) of a module's compact form, or None when
    it has none: low rank and joint members (`.a`, `.b`), LoSparse (its factors and
    its residual's CSR `.s_crow`, `.s_col` (int32), `.s_values`, or its kept rows),
    MPO (`.core0` ... and `.scale` when calibrated). Quantized factors and cores are
    stored dequantized in the export's dtype."""
    from compressors import factors
    from compressors.losparse import LowRankSparse
    from compressors.mpo import MPO

    got = pair(f, member)
    if got is not None:
        return {"kind": "lowrank", "rank": got[0].shape[1]}, {"a": got[0], "b": got[1]}
    if isinstance(f, LowRankSparse):
        a, b = factors.dense(f.a), factors.dense(f.b)
        spec, parts = {"kind": "losparse", "rank": a.shape[1]}, {"a": a, "b": b}
        if f.rows is not None:
            spec["rows"] = int(f.rows.numel())
            parts |= {"rows": f.rows.to(torch.int64), "row_values": f.row_values}
        else:
            spec["nnz"] = f.s.nnz
            parts |= {
                "s_crow": f.s.crow.to(torch.int32),
                "s_col": f.s.col.to(torch.int32),
                "s_values": f.s.values,
            }
        return spec, parts
    if isinstance(f, MPO):
        cores = [factors.dense(c) for c in f.cores]
        shapes = [list(c.shape) for c in cores]
        spec = {"kind": "mpo", "cores": shapes, "scale": f.scale is not None}
        parts = {f"core{i}": c for i, c in enumerate(cores)}
        if f.scale is not None:
            parts["scale"] = f.scale
        return spec, parts
    return None


def _numbers(parts: dict[str, torch.Tensor]) -> int:
    """Stored size in 16-bit-number units (an int32 index counts as two)."""
    return sum(t.numel() * (1 if t.is_floating_point() else 2) for t in parts.values())


def plan(src) -> tuple[dict, dict[str, str]]:
    """({module: (spec, tensors)} of the modules kept compact, {module: why dense} of the
    others); a form that is not smaller than the dense matrix is stored dense."""
    from compressors.registry import method_of_factorization

    compact, dense = {}, {}
    for name in src.compressed():
        f = src.factorization(name)
        got = form(f, src.member(name))
        if got is None:
            method = method_of_factorization(f)
            what = method.name if method is not None else type(f).__name__
            dense[name] = f"{what}: no compact form in the hf export (reconstructed)"
            continue
        spec, parts = got
        m, n = f.shape
        if _numbers(parts) >= m * n:
            what = f"rank {spec['rank']}" if spec["kind"] == "lowrank" else spec["kind"]
            dense[name] = f"{what} of ({m}, {n}) is not smaller than dense"
            continue
        compact[name] = got
    return compact, dense


STORED = {
    "lowrank": lambda s: f"low rank, factors of rank {s['rank']}",
    "losparse": lambda s: (
        f"low rank {s['rank']} + sparse "
        + (f"{s['rows']} rows" if "rows" in s else f"{s['nnz']} nonzeros")
    ),
    "mpo": lambda s: f"MPO, {len(s['cores'])} cores, bond {max(c[3] for c in s['cores'])}",
}


def write(tmp: Path, src, dtype) -> tuple[list[dict], dict]:
    """The compact checkpoint into `tmp`, a part (a block, or a module outside the
    blocks) at a time: (one summary row per compressed module, with the bytes it
    takes; {"bytes_by_kind": bytes per form: lowrank, losparse, mpo, dense})."""
    from safetensors.torch import save_file

    from compressors import width_model
    from spectra.export.source import cast, shard_names, write_index

    compact, dense = plan(src)
    blocks = getattr(src, "blocks", None)  # width's per-block widths
    # DeciLM's layout (pre-norm blocks): the norms of removed sublayers left out
    deci = bool(blocks) and src.config.model_type in DECI_BASES
    parts = [width_model.kept(part, blocks if deci else None) for part in src.parts()]
    named = {k for part in parts for k in part}
    tied = [f"{k}.weight" for k in compact if f"{k}.weight" not in named]  # a tied head
    if tied:
        parts = [*parts, tied]
    weight_map, total, held = {}, 0, {}  # held: bytes stored per compressed module
    for file, names in zip(shard_names(parts), parts, strict=True):
        state = {}
        for k in names:
            owner, _, attr = k.rpartition(".")
            if owner in compact and attr == "weight":
                for suffix, t in compact[owner][1].items():
                    state[f"{owner}.{suffix}"] = cast(t, dtype) if t.is_floating_point() else t
                    held[owner] = held.get(owner, 0) + _bytes(state[f"{owner}.{suffix}"])
            else:
                state[k] = cast(src.value(k), dtype)
                if owner in dense and attr == "weight":
                    held[owner] = _bytes(state[k])
        state = {k: v.contiguous() for k, v in state.items()}
        save_file(state, tmp / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(state, file))
        total += sum(_bytes(t) for t in state.values())
        del state
    write_index(tmp, weight_map, total)
    write_config(tmp, src, dtype, compact, blocks)
    if src.dense.can_generate() and src.dense.generation_config is not None:
        src.dense.generation_config.save_pretrained(tmp)
    rows = [
        dict(module=k, stored=STORED[spec["kind"]](spec), reason=None, bytes=held[k])
        for k, (spec, _) in compact.items()
    ]
    rows += [dict(module=k, stored="dense", reason=why, bytes=held[k]) for k, why in dense.items()]
    by_kind: dict[str, int] = {}
    for k, (spec, _) in compact.items():
        by_kind[spec["kind"]] = by_kind.get(spec["kind"], 0) + held[k]
    if dense:
        by_kind["dense"] = sum(held[k] for k in dense)
    return rows, dict(bytes_by_kind=by_kind)


def write_config(tmp: Path, src, dtype, compact: dict, blocks: list[dict] | None) -> None:
    """config.json into `tmp`, with the modeling file where the checkpoint needs it: the
    project's architecture for compact modules or per-block widths (`auto_map`), made
    DeciLM's for per-block widths of a base DeciLM covers (DECI_BASES)."""
    base = type(src.dense).__name__
    config = src.config
    deci = bool(blocks) and config.model_type in DECI_BASES
    if compact or blocks:  # the project's modeling file builds them
        config.architectures = [f"Spectra{base}"]
        config.auto_map = {"AutoModelForCausalLM": f"{MODELING[:-3]}.Spectra{base}"}
        config.spectra_compact = {k: spec for k, (spec, _) in compact.items()}
        if blocks:
            config.spectra_blocks = blocks
        code = modeling(base, type(config).__name__ if deci else None)
        (tmp / MODELING).write_text(code)
    head = src.dense.get_output_embeddings()
    if head is not None and any(src.module(k) is head for k in compact):
        config.tie_word_embeddings = False  # a factorized head shares no matrix
    config.dtype = str(dtype).removeprefix("torch.")
    config.save_pretrained(tmp)
    if deci:
        _as_deci(tmp / "config.json", base, type(config).__name__, blocks)


def _bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _as_deci(path: Path, base: str, config_class: str, blocks: list[dict]) -> None:
    """config.json made DeciLM's (`DeciLMForCausalLM`, model_type nemotron-nas), which
    vLLM runs natively: per block, `block_configs` with the attention's
    `n_heads_in_group` (query heads per key/value head) and the ffn's
    `intermediate_size`, `no_op` for a removed sublayer; transformers loads it through
    the modeling file (`auto_map`: its configuration class reads `block_configs`)."""
    import json

    c = json.loads(path.read_text())
    heads = c["num_attention_heads"]
    c.update(DECI_BASES[c["model_type"]], spectra_base=base, spectra_base_config=config_class)
    c["block_configs"] = [
        {
            "attention": {"no_op": b["kv_heads"] == 0, "replace_with_linear": False,
                          "n_heads_in_group": heads // b["kv_heads"] if b["kv_heads"] else None},
            "ffn": {"no_op": b["ffn"] == 0, "replace_with_linear": False,
                    "intermediate_size": b["ffn"] or None},
        }
        for b in blocks
    ]  # fmt: skip
    c["auto_map"] = {"AutoConfig": f"{MODELING[:-3]}.SpectraDeciConfig", **c["auto_map"]}
    c["architectures"], c["model_type"] = ["DeciLMForCausalLM"], "nemotron-nas"
    path.write_text(json.dumps(c, indent=2, sort_keys=True) + "\n")
