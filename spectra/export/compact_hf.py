"""`--format hf`: a transformers checkpoint that keeps factorized modules factorized.

Each low-rank module (a `lowrank` module, or a member of a `joint` group: its own A_i
beside a copy of the group's shared V) is stored as its two factors, `NAME.a` (out, r)
and `NAME.b` (r, in), and runs as two thin products; every other module is stored
dense (reconstructed), and the summary says why. A factorization that is not smaller
than its dense matrix (r (m + n) >= m n) is stored dense too.

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

from spectra.io.remote_code import MODELING, TEMPLATE


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


def plan(src) -> tuple[dict, dict[str, str]]:
    """({module: rank} of the modules kept factorized, {module: why dense} of the others)."""
    from compressors.registry import method_of_factorization

    compact, dense = {}, {}
    for name in src.compressed():
        f = src.factorization(name)
        got = pair(f, src.member(name))
        if got is None:
            method = method_of_factorization(f)
            what = method.name if method is not None else type(f).__name__
            dense[name] = f"{what}: no compact form in the hf export (reconstructed)"
            continue
        (m, r), n = got[0].shape, got[1].shape[1]
        if r * (m + n) >= m * n:
            dense[name] = f"rank {r} of ({m}, {n}) is not smaller than dense"
            continue
        compact[name] = r
    return compact, dense


def write(tmp: Path, src, dtype) -> list[dict]:
    """The compact checkpoint into `tmp`, a part (a block, or a module outside the
    blocks) at a time; one summary row per compressed module."""
    from safetensors.torch import save_file

    from spectra.export.source import cast, shard_names, write_index

    compact, dense = plan(src)
    parts = src.parts()
    named = {k for part in parts for k in part}
    tied = [f"{k}.weight" for k in compact if f"{k}.weight" not in named]  # a tied head
    if tied:
        parts = [*parts, tied]
    weight_map, total = {}, 0
    for file, names in zip(shard_names(parts), parts, strict=True):
        state = {}
        for k in names:
            owner, _, attr = k.rpartition(".")
            if owner in compact and attr == "weight":
                a, b = pair(src.factorization(owner), src.member(owner))
                state[f"{owner}.a"], state[f"{owner}.b"] = cast(a, dtype), cast(b, dtype)
            else:
                state[k] = cast(src.value(k), dtype)
        state = {k: v.contiguous() for k, v in state.items()}
        save_file(state, tmp / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(state, file))
        total += sum(t.numel() * t.element_size() for t in state.values())
        del state
    write_index(tmp, weight_map, total)
    base = type(src.dense).__name__
    config = src.config
    config.architectures = [f"Spectra{base}"]
    config.auto_map = {"AutoModelForCausalLM": f"{MODELING[:-3]}.Spectra{base}"}
    config.spectra_compact = {k: {"kind": "lowrank", "rank": r} for k, r in compact.items()}
    head = src.dense.get_output_embeddings()
    if head is not None and any(src.module(k) is head for k in compact):
        config.tie_word_embeddings = False  # a factorized head shares no matrix
    config.dtype = str(dtype).removeprefix("torch.")
    config.save_pretrained(tmp)
    (tmp / MODELING).write_text(TEMPLATE.format(base=base))
    if src.dense.can_generate() and src.dense.generation_config is not None:
        src.dense.generation_config.save_pretrained(tmp)
    rows = [
        dict(module=k, stored=f"low rank, factors of rank {r}", reason=None)
        for k, r in compact.items()
    ]
    return rows + [dict(module=k, stored="dense", reason=why) for k, why in dense.items()]
