"""Lazy, torch-free reading of safetensors files.

The header is parsed by hand (8-byte little-endian length, then JSON) and each
tensor is read with one positioned read into a fresh buffer, so memory holds only
the tensors being worked on, never a mapping of the whole checkpoint.
"""

from __future__ import annotations

import functools
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from spectra.errors import SpectraInputError
from spectra.io import cache
from spectra.linalg import scratch

_MAX_HEADER = 100 * 2**20
# safetensors dtype -> (numpy dtype used to read the bytes, bytes per element)
_DTYPES = {
    "F64": (np.float64, 8),
    "F32": (np.float32, 4),
    "F16": (np.float16, 2),
    "BF16": (np.uint16, 2),  # widened to float32 by a 16-bit shift
    "I64": (np.int64, 8),
    "I32": (np.int32, 4),
    "I16": (np.int16, 2),
    "I8": (np.int8, 1),
    "U8": (np.uint8, 1),
    "BOOL": (np.bool_, 1),
}
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}


@dataclass(frozen=True)
class TensorRef:
    """Where one tensor lives: file, byte range, dtype and shape."""

    name: str
    path: Path
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    def read_bytes(self, buf: np.ndarray | None = None, offset: int = 0) -> np.ndarray:
        """The raw bytes, read into `buf` (uint8) when given: all nbytes, or from
        `offset` on as many as `buf` holds (a band of a tensor)."""
        buf = np.empty(self.nbytes, dtype=np.uint8) if buf is None else buf
        with open(self.path, "rb") as f:
            f.seek(self.start + offset)
            got = f.readinto(memoryview(buf))
        if got != len(buf) or offset + len(buf) > self.nbytes:
            raise SpectraInputError(f"{self.path}: truncated safetensors file (tensor {self.name})")
        return buf

    def read(self, dtype=np.float32) -> np.ndarray:
        """The tensor as a numpy array of `dtype` (bf16/f16 are widened exactly). To
        float32, the bytes are read into the tail of the fresh array and widened in
        place: no second buffer (a 128k-row head: 2.1 GB at its peak, not 4.2 GB)."""
        if np.dtype(dtype) == np.float32 and self.dtype in ("BF16", "F16", "F32"):
            out = np.empty(int(np.prod(self.shape, dtype=np.int64)), dtype=np.float32)
            raw = self.read_bytes(out.view(np.uint8)[out.nbytes - self.nbytes :])
            if self.dtype != "F32":
                _widen_in_place(out, raw, self.dtype)
            return out.reshape(self.shape)
        raw = self.read_bytes()
        np_dtype, _ = _DTYPES[self.dtype]
        arr = raw.view(np_dtype).reshape(self.shape)
        if self.dtype == "BF16":
            arr = (arr.astype(np.uint32) << 16).view(np.float32)
        return arr.astype(dtype, copy=False)

    def read_float(self, hashes: dict | None = None) -> np.ndarray:
        """The tensor in this thread's scratch buffer (valid until the next call), as
        float64 when stored as F64 and float32 otherwise (16-bit floats widen exactly).

        The file's bytes are read into the tail of the buffer and a 16-bit tensor is
        widened in place, front to back, so no second buffer of the raw size is ever
        touched (fresh memory is the slowest part of reading a checkpoint). With
        `hashes`, the content hash of the bytes is stored under this tensor's name.
        """

        wide = np.float64 if self.dtype == "F64" else np.float32
        n = int(np.prod(self.shape, dtype=np.int64))
        out = scratch.buffer("weight", n, wide)
        raw = out.view(np.uint8)[out.nbytes - self.nbytes :]
        self.read_bytes(raw)
        if hashes is not None:
            hashes[self.name] = cache.hash_bytes(raw)
        if self.dtype not in ("F64", "F32"):
            _widen_in_place(out, raw, self.dtype)
        return out.reshape(self.shape)


def iter_row_chunks(ref: TensorRef, rows: int, hashes: dict | None = None):
    """Yield a 2-D tensor as float64 blocks of at most `rows` rows, in scratch buffers.

    With `hashes`, the content hash of all its bytes (streamed, identical to a one-shot
    hash) is stored under the tensor's name once the last block has been read.
    """
    import xxhash

    a, b = ref.shape
    np_dtype, e = _DTYPES[ref.dtype]
    digest = xxhash.xxh3_128() if hashes is not None else None
    with open(ref.path, "rb") as f:
        for lo in range(0, a, rows):
            r = min(rows, a - lo)
            raw = scratch.buffer("chunk_raw", r * b * e, np.uint8)
            f.seek(ref.start + lo * b * e)
            if f.readinto(memoryview(raw)) != raw.size:
                raise SpectraInputError(f"{ref.path}: truncated safetensors file ({ref.name})")
            if digest is not None:
                digest.update(raw)
            out = scratch.buffer("chunk64", r * b).reshape(r, b)
            np.copyto(out, _as_float(raw.view(np_dtype).reshape(r, b), ref.dtype))
            yield out
    if hashes is not None:
        hashes[ref.name] = digest.hexdigest()


def _widen_in_place(out: np.ndarray, raw: np.ndarray, dtype: str) -> None:
    """Convert the elements stored in `raw` (the tail of `out`'s bytes) into `out`.

    With element sizes e (source) and t (out), chunk [i0, i1) is written to bytes
    [t i0, t i1), which must end before the source bytes of element i0:
    t i1 <= t n - e n + e i0. The chunks grow geometrically smaller, and the last few
    elements go through a small copy.
    """
    n, e, t = out.size, _DTYPES[dtype][1], out.itemsize
    src = raw.view(_DTYPES[dtype][0])
    i0 = 0
    while True:
        i1 = (t * n - e * n + e * i0) // t
        if i1 - i0 < 4096:
            break
        np.copyto(out[i0:i1], _as_float(src[i0:i1], dtype))
        i0 = i1
    out[i0:] = _as_float(src[i0:].copy(), dtype)


def _as_float(a: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "BF16":
        return (a.astype(np.uint32) << 16).view(np.float32)
    return a


def read_header(path: str | os.PathLike) -> list[TensorRef]:
    """Parse a safetensors header; raise SpectraInputError naming the file if it is corrupt.

    Parsed headers are kept while the file's size and mtime are unchanged: every
    command checks its model's files once when it resolves the model, then lists them.
    """
    path = Path(path)
    try:
        st = path.stat()
    except OSError as e:
        raise SpectraInputError(f"{path}: cannot read ({e.strerror})") from e
    return list(_read_header(path, st.st_size, st.st_mtime_ns, st.st_ino))


@functools.lru_cache(maxsize=256)
def _read_header(path: Path, size: int, mtime_ns: int, inode: int) -> tuple[TensorRef, ...]:
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise SpectraInputError(f"{path}: not a safetensors file (too short)")
            (n,) = struct.unpack("<Q", head)
            if n == 0 or n > _MAX_HEADER:
                raise SpectraInputError(f"{path}: not a safetensors file (corrupt header)")
            if 8 + n > size:
                raise SpectraInputError(
                    f"{path}: truncated safetensors file ({size:,} bytes, its header "
                    f"declares {8 + n:,} for itself)"
                )
            meta = json.loads(f.read(n))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SpectraInputError(
            f"{path}: corrupt safetensors header ({e.__class__.__name__})"
        ) from e
    except OSError as e:
        raise SpectraInputError(f"{path}: cannot read ({e.strerror})") from e
    if not isinstance(meta, dict):
        raise SpectraInputError(f"{path}: corrupt safetensors header")
    base = 8 + n
    ends = [
        info.get("data_offsets", [0, 0])[1]
        for name, info in meta.items()
        if name != "__metadata__" and isinstance(info, dict)
    ]
    declared = base + max((e for e in ends if isinstance(e, int)), default=0)
    if declared > size:
        raise SpectraInputError(
            f"{path}: truncated safetensors file ({size:,} bytes, its header declares {declared:,})"
        )
    refs = []
    for name, info in meta.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape = info["dtype"], tuple(int(s) for s in info["shape"])
            lo, hi = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise SpectraInputError(f"{path}: corrupt safetensors entry for {name!r}") from e
        if dtype not in _DTYPES:
            continue  # fp8 and friends: not analysed
        expected = int(np.prod(shape, dtype=np.int64)) * _DTYPES[dtype][1]
        if hi - lo != expected or lo < 0 or base + hi > size:
            raise SpectraInputError(
                f"{path}: corrupt or truncated safetensors file (tensor {name!r} out of range)"
            )
        refs.append(TensorRef(name, path, dtype, shape, base + lo, base + hi))
    return tuple(refs)
