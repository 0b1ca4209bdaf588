"""On-disk cache: where it lives, content fingerprints, atomic writes.

Results are keyed by the content of the weights (xxh3-128 of every tensor's bytes),
the computation's settings and CACHE_VERSION. Per-file tensor hashes are memoised
against the file's size, mtime and inode, so a repeat run stats files instead of
reading them; a rewritten file gets a new mtime and is hashed again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

import xxhash

from spectra.errors import SpectraInputError
from spectra.linalg import scratch

CACHE_VERSION = 1
_REPO_ROOT = Path(__file__).resolve().parents[2]  # spectra/io/cache.py -> the checkout


def cache_dir() -> Path:
    """`SPECTRA_CACHE`, else the checkout's `cache/`, else the user cache directory."""
    env = os.environ.get("SPECTRA_CACHE")
    if env:
        return Path(env)
    if (_REPO_ROOT / "pyproject.toml").is_file() and (_REPO_ROOT / "cache").is_dir():
        return _REPO_ROOT / "cache"
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "spectra"


def key(*parts: object) -> str:
    """A short stable key for JSON-serialisable parts."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:24]


def hash_bytes(buf) -> str:
    return xxhash.xxh3_128(buf).hexdigest()


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike):
    """Yield a temporary path beside `final`; rename it over `final` only on success."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike, force: bool = False):
    """Yield an empty temporary directory beside `final`; it replaces `final` only on
    success. An existing `final` is refused (SpectraInputError) unless `force`."""
    final = Path(final)
    if final.exists() and not force:
        raise SpectraInputError(f"{final}: already exists (pass --force to replace it)")
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if final.exists():
            old = final.parent / f".{final.name}.old-{os.getpid()}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(path: str | os.PathLike, obj) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=1, sort_keys=True))


def read_json(path: str | os.PathLike):
    """Parsed JSON, or None when the file is missing or unreadable (a cache miss)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def file_stamp(path: Path) -> list:
    """What must be unchanged for a file's memoised tensor hashes to be reused."""
    st = path.stat()
    return [str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino, CACHE_VERSION]


def _memo_path(path: Path) -> Path:
    return cache_dir() / "hashes" / f"{key(str(path.resolve()))}.json"


def memoized_hashes(path: Path, stamp: list) -> dict[str, str] | None:
    """The tensor hashes remembered for `path`, or None when absent, stale or corrupt."""
    cached = read_json(_memo_path(path))
    if isinstance(cached, dict) and cached.get("stamp") == stamp:
        tensors = cached.get("tensors")
        if isinstance(tensors, dict):
            return tensors
    return None


def store_hashes(path: Path, stamp: list, hashes: dict[str, str]) -> None:
    write_json(_memo_path(path), {"stamp": stamp, "tensors": hashes})


PIECE = 64 * 2**20  # bytes hashed at a time


def file_tensor_hashes(path: Path, refs: Iterable) -> dict[str, str]:
    """Content hash of every tensor in one safetensors file, memoised by file stat."""
    stamp = file_stamp(path)
    hashes = memoized_hashes(path, stamp)
    if hashes is not None:
        return hashes
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    def one(r):  # in pieces (the same digest as one-shot): no buffer of a whole tensor
        digest = xxhash.xxh3_128()
        for lo in range(0, r.nbytes, PIECE):
            buf = scratch.buffer("raw", min(PIECE, r.nbytes - lo), np.uint8)
            digest.update(r.read_bytes(buf, offset=lo))
        return r.name, digest.hexdigest()

    with ThreadPoolExecutor(max(1, min(os.cpu_count() or 1, 8))) as pool:
        hashes = dict(pool.map(one, refs))
    store_hashes(path, stamp, hashes)
    return hashes
