"""GGUF headers read by hand: what a file declares (tensors, extent, storage type).

A truncated download is the commonest bad GGUF file, and the gguf package reports it
as an unrelated reshape error; reading the header first lets us say "truncated" and
how short the file is. Layout (GGUF v2/v3, little-endian): magic, version, tensor
and key-value counts, the key-value pairs, the tensor infos (name, dims, ggml type,
offset into the data section), then the data section at the next multiple of
`general.alignment` (default 32).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

from spectra.errors import SpectraInputError

# value type -> struct format of a scalar (8: string, 9: array handled apart)
_SCALARS = {
    0: "B",
    1: "b",
    2: "H",
    3: "h",
    4: "I",
    5: "i",
    6: "f",
    7: "?",
    10: "Q",
    11: "q",
    12: "d",
}


@dataclass(frozen=True)
class GGUFHeader:
    path: Path
    version: int
    meta: dict  # scalar and string key-values (arrays are skipped)
    tensor_types: dict[str, int]  # ggml type name -> number of tensors
    declared_bytes: int  # where the last tensor's data ends
    file_bytes: int

    @property
    def storage(self) -> str:
        """e.g. `GGUF Q4_K_M`: the file type the header names, else its commonest tensor type."""
        import gguf

        ft = self.meta.get("general.file_type")
        try:
            name = gguf.LlamaFileType(ft).name.removeprefix("MOSTLY_")
        except (ValueError, TypeError):
            name = max(self.tensor_types, key=self.tensor_types.get, default="?")
        return f"GGUF {name}"


class _Reader:
    def __init__(self, f, path):
        self.f, self.path = f, path

    def take(self, fmt: str):
        size = struct.calcsize("<" + fmt)
        raw = self.f.read(size)
        if len(raw) != size:
            raise SpectraInputError(f"{self.path}: truncated GGUF file (header cut short)")
        return struct.unpack("<" + fmt, raw)[0]

    def string(self) -> str:
        n = self.take("Q")
        if n > 2**30:
            raise SpectraInputError(f"{self.path}: corrupt GGUF header (string of {n} bytes)")
        raw = self.f.read(n)
        if len(raw) != n:
            raise SpectraInputError(f"{self.path}: truncated GGUF file (header cut short)")
        return raw.decode("utf-8", errors="replace")

    def value(self, vtype: int):
        if vtype in _SCALARS:
            return self.take(_SCALARS[vtype])
        if vtype == 8:
            return self.string()
        if vtype == 9:
            inner, n = self.take("I"), self.take("Q")
            if inner in _SCALARS:  # skip the items without decoding them one by one
                self.f.seek(n * struct.calcsize("<" + _SCALARS[inner]), 1)
            else:
                for _ in range(n):
                    self.value(inner)
            return None
        raise SpectraInputError(f"{self.path}: corrupt GGUF header (value type {vtype})")


def read_header(path: str | Path) -> GGUFHeader:
    """Parse the header; SpectraInputError names the file when it is not a GGUF file,
    is corrupt, or is shorter than its header declares ("truncated")."""
    import gguf

    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF":
                raise SpectraInputError(f"{path}: not a GGUF file (bad magic)")
            r = _Reader(f, path)
            version = r.take("I")
            if version not in (2, 3):
                raise SpectraInputError(f"{path}: unsupported GGUF version {version}")
            n_tensors, n_kv = r.take("Q"), r.take("Q")
            if n_tensors > 10**7 or n_kv > 10**7:
                raise SpectraInputError(f"{path}: corrupt GGUF header (counts)")
            meta = {}
            for _ in range(n_kv):
                key = r.string()
                value = r.value(r.take("I"))
                if value is not None:
                    meta[key] = value
            types: dict[str, int] = {}
            end = 0
            for _ in range(n_tensors):
                r.string()
                dims = [r.take("Q") for _ in range(r.take("I"))]
                ggml, offset = r.take("I"), r.take("Q")
                try:
                    kind = gguf.GGMLQuantizationType(ggml)
                    block, nbytes = gguf.GGML_QUANT_SIZES[kind]
                except (ValueError, KeyError) as e:
                    raise SpectraInputError(f"{path}: corrupt GGUF header (type {ggml})") from e
                count = 1
                for d in dims:
                    count *= d
                types[kind.name] = types.get(kind.name, 0) + 1
                end = max(end, offset + count // block * nbytes)
            align = int(meta.get("general.alignment", 32) or 32)
            start = -(-f.tell() // align) * align
    except OSError as e:
        raise SpectraInputError(f"{path}: cannot read ({e.strerror})") from e
    header = GGUFHeader(path, version, meta, types, start + end, size)
    if header.declared_bytes > size:
        raise SpectraInputError(
            f"{path}: truncated GGUF file ({size:,} bytes, its header declares "
            f"{header.declared_bytes:,})"
        )
    return header
