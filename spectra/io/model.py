"""One resolved model: where it is, what it is, and how it is run.

Each entry point (a CLI command, the app's session, a Ray worker) calls
`open_model(spec, device, dtype, offload)` once; everything below takes the `Model` it
returns and never a model string. A Model computes each fact about the model once,
when first asked: its config, the content fingerprint, the list of 2-D matrices, the
tokenizer, the context length; `load()` builds it in the chosen way; `cache_key(*parts)`
is the one rule every cache keys off. It also decides:
- the working dtype: `auto` keeps the checkpoint's (the dtype most of its floating
  bytes are stored in: bf16 for most released models, float32 for a de-quantized
  GGUF), or float32 / bfloat16 / float16;
- the offload: `none` keeps every weight resident on the device, `disk` leaves them
  in the safetensors files and materialises one block at a time
  (spectra.io.offload), `auto` keeps them resident when they take at most half of
  the memory that is free, else streams them;
- whether it fits at all: resident needs the whole model, streamed the modules
  outside the blocks plus the largest block, each with a margin for the work. A model
  that cannot fit is refused here, before any work, with one line naming the need.
A compressed OUT of `spectra apply` is one more kind of it (compressors.opened).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from spectra.errors import SpectraInputError
from spectra.io import cache, models, remote_code, roles
from spectra.io.devices import check_dtype, free_bytes, where
from spectra.io.tensors import FLOAT_DTYPES, TensorRef, read_header

DTYPES = ("auto", "float32", "bfloat16", "float16")
OFFLOADS = ("auto", "none", "disk")
_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8}
_STORED = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float32"}
RESIDENT_SHARE = 0.5  # `auto` streams a model that would take more of the free memory
WORK_MARGIN = 1.25  # activations, Grams and the factorization's scratch beside weights
_BLOCK = re.compile(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)\.")


@dataclass(frozen=True)
class Matrix:
    """One 2-D weight: where it is stored and how to read it as (out, in)."""

    name: str  # module name, e.g. model.layers.0.mlp.up_proj
    ref: TensorRef
    role: str
    block: int | None
    transposed: bool  # stored (in, out) (GPT-2 Conv1D): transpose on read

    @property
    def shape(self) -> tuple[int, int]:
        a, b = self.ref.shape
        return (b, a) if self.transposed else (a, b)

    def read(self, dtype=np.float32) -> np.ndarray:
        """A fresh (out, in) array of `dtype`."""
        w = self.ref.read(dtype)
        return w.T if self.transposed else w

    def read_scratch(self, hashes: dict | None = None) -> np.ndarray:
        """(out, in) float32 (float64 if stored so) in this thread's scratch buffer,
        valid until its next read."""
        w = self.ref.read_float(hashes)
        return w.T if self.transposed else w


@dataclass(frozen=True, eq=False)
class Model:
    """A resolved model and the way it is run; built by `open_model`.

    Attributes:
        spec: what the user named it (messages and reports say this).
        source: the local safetensors directory it resolved to.
        device: cpu or cuda[:i].
        dtype: the working dtype: float32 | bfloat16 | float16.
        offload: none | disk.
    """

    spec: str
    source: models.Source
    device: str
    dtype: str
    offload: str
    kind = "model"  # a compressed OUT is "compressed" (compressors.opened)

    def __str__(self) -> str:
        return self.spec

    @functools.cached_property
    def config(self) -> dict:
        """config.json as a dict ({} when the checkpoint has none)."""
        data = cache.read_json(self.source.root / "config.json")
        return data if isinstance(data, dict) else {}

    @functools.cached_property
    def matrices(self) -> list[Matrix]:
        """Every 2-D floating-point weight, in checkpoint order, without reading it."""
        return matrices(self.source)

    def matrix(self, name: str) -> Matrix:
        """The matrix of module `name` (bad input when there is none)."""
        found = self._by_name.get(name)
        if found is None:
            raise SpectraInputError(f"{self.spec}: no 2-D weight named {name}")
        return found

    @functools.cached_property
    def _by_name(self) -> dict:
        return {m.name: m for m in self.matrices}

    @functools.cached_property
    def fingerprint(self) -> str:
        """Content key of all the model's weights (2-D hashes memoised, the rest read)."""
        parts = []
        for f in self.source.files:
            refs = [m.ref for m in self.matrices if m.ref.path == f]
            hashes = cache.file_tensor_hashes(f, refs)
            known = {r.name for r in refs}
            for r in read_header(f):
                h = hashes.get(r.name) if r.name in known else cache.hash_bytes(r.read_bytes())
                parts.append((r.name, h))
        return cache.key(cache.CACHE_VERSION, sorted(parts))

    def cache_key(self, *parts, runs: bool = True) -> str:
        """The key of a cached result about this model: its weights, `parts` (the
        computation's settings) and, when the result `runs` the model (activations,
        losses, Grams), the working dtype it ran in; weight-only results (spectra) are
        the same whatever the dtype."""
        return cache.key(self.fingerprint, self.dtype if runs else None, *parts)

    @functools.cached_property
    def context_length(self) -> int | None:
        """The longest sequence the config admits (positions), None if it says not."""
        for source in (self.config, self.config.get("text_config") or {}):
            for key in CONTEXT_KEYS:
                if isinstance(source.get(key), int) and source[key] > 0:
                    return source[key]
        return None

    @property
    def torch_dtype(self):
        import torch

        return getattr(torch, self.dtype)

    def tokenizer(self):
        """The model's tokenizer, loaded once (bad input when it has none: said again
        to each caller)."""
        if "tokenizer" not in self._memo:
            try:
                self._memo["tokenizer"] = self._read_tokenizer()
            except SpectraInputError as e:
                self._memo["tokenizer"] = e
        found = self._memo["tokenizer"]
        if isinstance(found, SpectraInputError):
            raise SpectraInputError(str(found))
        return found

    def _read_tokenizer(self):
        return tokenizer(self.source)

    def has_tokenizer(self) -> bool:
        try:
            self.tokenizer()
        except SpectraInputError:
            return False
        return True

    def load(self):
        """The model: resident on the device, or a skeleton whose blocks stay on disk.
        A new one each call (the caller may change it)."""
        if self.offload == "none":
            return build(self.source, self.device, self.torch_dtype)
        from spectra.io.offload import skeleton

        require_config(self.source)
        return skeleton(self.source.root, self.source.files, self.torch_dtype, self.device)

    def shared(self):
        """`load()` once, shared by every caller that only reads it (never mutate it)."""
        if "model" not in self._memo:
            self._memo["model"] = self.load()
        return self._memo["model"]

    @functools.cached_property
    def _memo(self) -> dict:
        return {}

    def with_run(
        self, device: str | None = None, dtype: str | None = None, offload: str | None = None
    ) -> Model:
        """The same model run another way (the facts already computed are kept)."""
        other = open_source(
            self.spec,
            self.source,
            device or self.device,
            dtype or self.dtype,
            offload or self.offload,
        )
        for fact in ("config", "matrices", "fingerprint", "_by_name"):
            if fact in self.__dict__:
                other.__dict__[fact] = self.__dict__[fact]
        return other

    def describe(self) -> dict:
        """dtype, device, offload, the memory it expects to use resident and streamed
        (weights with the work margin) and the memory free now, in GB."""
        need = footprint(self.source, self.dtype)
        free = free_bytes(self.device)
        return dict(
            dtype=self.dtype,
            device=self.device,
            offload=self.offload,
            resident_gb=round(need["total"] * WORK_MARGIN / 1e9, 3),
            streamed_gb=round((need["outer"] + need["block"]) * WORK_MARGIN / 1e9, 3),
            free_gb=None if free is None else round(free / 1e9, 3),
        )


CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


def open_model(
    spec: str,
    device: str = "auto",
    dtype: str = "auto",
    offload: str = "auto",
    progress=None,
    fit: bool = True,
) -> Model:
    """Resolve `spec` and choose its dtype and offload (see the module docstring);
    `progress(done, total, message)` hears about a one-time GGUF conversion; `fit`:
    refuse a model the memory cannot hold (False: the caller checks a larger need)."""
    if dtype not in DTYPES:
        raise SpectraInputError(f"--dtype {dtype}: expected one of {', '.join(DTYPES)}")
    if offload not in OFFLOADS:
        raise SpectraInputError(f"--offload {offload}: expected one of {', '.join(OFFLOADS)}")
    source = models.resolve(spec, progress)
    return open_source(str(spec), source, models.resolve_device(device), dtype, offload, fit)


def open_source(
    spec: str, source: models.Source, device: str, dtype: str, offload: str, fit: bool = True
) -> Model:
    """`open_model` of a source already resolved, on a resolved device."""
    dtype = stored_dtype(source) if dtype == "auto" else dtype
    check_dtype(dtype, device)
    need = footprint(source, dtype)
    free = free_bytes(device)
    resident = need["total"] * WORK_MARGIN
    streamed = (need["outer"] + need["block"]) * WORK_MARGIN
    if offload == "auto":
        offload = "none" if free is None or resident <= RESIDENT_SHARE * free else "disk"
    if free is not None and fit:
        wanted = resident if offload == "none" else streamed
        if wanted > free:
            hint = "; try --offload disk" if offload == "none" and streamed <= free else ""
            raise SpectraInputError(
                f"{spec}: needs about {wanted / 1e9:.3g} GB of {where(device)} memory in "
                f"{dtype} with --offload {offload}, {free / 1e9:.3g} GB is free{hint}"
            )
    return Model(spec, source, device, dtype, offload)


def stored_dtype(source: models.Source) -> str:
    """The dtype most of the checkpoint's floating-point bytes are stored in."""
    return majority_dtype(ref for f in source.files for ref in read_header(f))


def majority_dtype(refs) -> str:
    """The dtype most of these tensors' floating-point bytes are stored in."""
    sizes: dict[str, int] = {}
    for ref in refs:
        if ref.dtype in _STORED:
            sizes[_STORED[ref.dtype]] = sizes.get(_STORED[ref.dtype], 0) + ref.nbytes
    return max(sizes, key=sizes.get) if sizes else "float32"


def footprint(source: models.Source, dtype: str) -> dict:
    """Bytes in `dtype`: `total`, `outer` (outside the blocks) and the largest `block`."""
    per_block: dict[int, int] = {}
    outer = 0
    for f in source.files:
        for ref in read_header(f):
            if ref.dtype not in _STORED:
                continue
            size = ref.nbytes // _BYTES[_STORED[ref.dtype]] * _BYTES[dtype]
            m = _BLOCK.search(ref.name)
            if m:
                per_block[int(m.group(1))] = per_block.get(int(m.group(1)), 0) + size
            else:
                outer += size
    block = max(per_block.values(), default=0)
    return {"total": outer + sum(per_block.values()), "outer": outer, "block": block}


def matrices(source: models.Source) -> list[Matrix]:
    """Every 2-D floating-point weight of the model, in checkpoint order, without reading it."""
    out = []
    for f in source.files:
        for ref in read_header(f):
            if len(ref.shape) != 2 or ref.dtype not in FLOAT_DTYPES or min(ref.shape) < 2:
                continue
            name = roles.module_name(ref.name)
            out.append(
                Matrix(
                    name=name,
                    ref=ref,
                    role=roles.role_of(name),
                    block=roles.block_of(name),
                    transposed=roles.is_conv1d(name, source.model_type),
                )
            )
    if not out:
        raise SpectraInputError(f"{source.root}: no 2-D weights found")
    return out


def weights(source: models.Source) -> Iterator[tuple[str, object]]:
    """Yield (module name, torch tensor (out, in)) one at a time, read lazily from disk."""
    import torch

    for m in matrices(source):
        yield m.name, torch.from_numpy(np.ascontiguousarray(m.read(np.float32)))


def build(source: models.Source, device: str, dtype=None):
    """The transformers causal LM of `source`, resident on `device` (a resolved one)."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    require_config(source)
    hf_logging.disable_progress_bar()  # the caller shows its own progress
    try:
        # a compact hf export runs its modeling file, which must be exactly spectra's
        model = AutoModelForCausalLM.from_pretrained(
            source.root, dtype=dtype or torch.float32, **remote_code.trusted(source.root)
        )
    except (OSError, ValueError, KeyError) as e:
        raise SpectraInputError(f"{source.spec}: cannot load model ({models.first_line(e)})") from e
    return model.to(device).eval()


def require_config(source: models.Source) -> None:
    """Building the model needs its config.json (analysis alone does not)."""
    if not (source.root / "config.json").is_file():
        raise SpectraInputError(f"{source.root} has no config.json: the model cannot be built")


def tokenizer(source: models.Source):
    """The tokenizer stored beside the weights (bad input when there is none)."""
    from transformers import AutoTokenizer

    require_config(source)
    try:
        return AutoTokenizer.from_pretrained(source.root, **remote_code.trusted(source.root))
    except (OSError, ValueError) as e:
        raise SpectraInputError(
            f"{source.spec}: cannot load tokenizer ({models.first_line(e)})"
        ) from e
