"""Exports of a `spectra apply` output that other engines load.

- `compressed-tensors` (spectra.export.ctensors): vLLM and transformers;
- `gguf` (spectra.export.gguf_out): llama.cpp and what is built on it;
- `hf`: the dense reconstruction, an ordinary transformers checkpoint.

Every export is written into a temporary sibling of DIR and renamed at the end, so DIR
appears only when complete; an existing DIR is refused unless `force`. The source OUT
is only read.
"""

from __future__ import annotations

import time
from pathlib import Path

from spectra.errors import SpectraInputError

FORMATS = ("compressed-tensors", "gguf", "hf")
GGUF_TYPES = ("F16", "Q8_0", "Q4_0")
DTYPES = ("auto", "float32", "float16", "bfloat16")
SERVE = {  # the command that serves each export
    "compressed-tensors": "vllm serve {dir}",
    "gguf": "llama-cli -m {dir}/model.gguf",
    "hf": "vllm serve {dir}",
}


def export(
    model,
    fmt: str,
    dest,
    gguf_type: str = "Q8_0",
    dtype: str = "auto",
    force: bool = False,
    embedding_type: str | None = None,
) -> dict:
    """Write the apply output `model` (compressors.opened.Compressed) as `fmt` into
    `dest`; returns the summary (files, bytes, modules). `embedding_type`: a GGUF
    export's token embedding and output head in that type instead of `gguf_type` (as
    llama.cpp's `llama-quantize --token-embedding-type`), unless they are compressed.

    The model's offload says how OUT is read: `none` loads it whole; `disk` reads it a
    tensor at a time and writes a part (a block, or a module outside the blocks) at a
    time."""
    import torch

    from compressors import io
    from spectra.export import source as sources
    from spectra.io.cache import atomic_dir

    out, dest = model.source.root, Path(dest)
    for flag, value, allowed in (
        ("--format", fmt, FORMATS),
        ("--gguf-type", gguf_type, GGUF_TYPES),
        ("--dtype", dtype, DTYPES),
        ("--gguf-embedding-type", embedding_type or gguf_type, GGUF_TYPES),
    ):
        if value not in allowed:
            raise SpectraInputError(f"{flag} {value!r}: must be one of {', '.join(allowed)}")
    if dest.resolve() == out.resolve() or out.resolve() in dest.resolve().parents:
        raise SpectraInputError(f"{dest}: inside the source {out}; choose another directory")
    if dest.exists() and not force:
        raise SpectraInputError(f"{dest}: already exists (pass --force to replace it)")
    if fmt == "compressed-tensors":
        from spectra.export import ctensors

        ctensors.require_package()
    t0 = time.perf_counter()
    offload = model.offload
    src = sources.Streamed(out) if offload == "disk" else sources.Resident(*io.load(out))
    if getattr(src, "blocks", None) and fmt == "compressed-tensors":
        from spectra.io.remote_code import DECI_BASES

        if src.config.model_type not in DECI_BASES:
            raise SpectraInputError(
                f"{out}: width left its blocks with different widths, which "
                f"compressed-tensors writes as DeciLM's block_configs for "
                f"{', '.join(DECI_BASES)} only, not {src.config.model_type}: --format hf "
                "or gguf, or one width in every block (plan auto --uniform)"
            )
    tokenizer = _tokenizer(out)
    torch_dtype = src.dtype if dtype == "auto" else getattr(torch, dtype)
    sizes = {}
    with atomic_dir(dest, force) as tmp:
        if fmt == "compressed-tensors":
            rows, sizes = ctensors.write(tmp, src, tokenizer, torch_dtype)
        elif fmt == "gguf":
            from spectra.export import gguf_out

            rows = gguf_out.write(tmp, out, src, tokenizer, gguf_type, embedding_type)
            if tokenizer is not None:  # for `spectra serve-check`'s windows; not weights
                tokenizer.save_pretrained(tmp / "tokenizer")
        else:
            from spectra.export import compact_hf

            rows, sizes = compact_hf.write(tmp, src, torch_dtype)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
        files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()}
    return dict(
        source=str(out),
        format=fmt,
        out=str(dest),
        gguf_type=gguf_type if fmt == "gguf" else None,
        gguf_embedding_type=(embedding_type or gguf_type) if fmt == "gguf" else None,
        dtype=str(torch_dtype).removeprefix("torch.") if fmt != "gguf" else None,
        offload=offload,
        files=files,
        bytes=sum(files.values()),
        modules=rows,
        **sizes,
        seconds=round(time.perf_counter() - t0, 2),
    )


def _tokenizer(out: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(out)
    except (OSError, ValueError):
        return None


def loadable(path) -> Path | None:
    """The file or directory that `spectra eval` loads for an export DIR: the .gguf
    inside a gguf export, else None (a Hugging Face layout loads as a directory)."""
    path = Path(path)
    if path.is_dir() and not (path / "config.json").is_file():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ggufs[0]
    return None
