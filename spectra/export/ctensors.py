"""The compressed-tensors checkpoint (llm-compressor's format, read by vLLM and transformers).

`quant` modules go in the pack-quantized layout, symmetric, with exactly their own
codes and scales: a symmetric grid of ours is compressed-tensors' own (its signed codes
are ours minus 2^(bits-1)), stored at its width when that is 4 or 8 and otherwise in
the smallest of int4 and int8 that holds it (a 2- or 3-bit grid in int4). An
asymmetric grid is held exactly by the signed codes (code - zero point) on the same
scale: 2/3-bit grids fit int4, 4..7-bit grids int8. compressed-tensors' asymmetric
layout (packed zero points) would keep 4-bit grids at 4 bits, but transformers 5 with
compressed-tensors 0.20 cannot load it (the zero points are allocated unpacked: a
size mismatch), so set `symmetric: true` in a plan meant for vLLM or transformers.
Codes are packed by the package's own `pack_to_int32`. A group of ours that does not
divide the row (128 on a 576-column row: four full groups and a 64-wide tail) is
written at the group size gcd(group, columns), every scale repeated over the groups it
covers, which is lossless; compressed-tensors needs whole groups.
Everything else is written dense, reconstructed, and named with the reason each
method declares (compressors.method.Method.exports: factorized forms have no such
format, nor E8P lattice codes; compressed-tensors >= 0.15, which transformers 5
requires, dropped its sparse-bitmask and 2:4 formats, so pruned modules keep their
zeros in a dense layout), or found here (8-bit asymmetric grids: no signed 8-bit
container holds them).
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

import torch

from spectra.errors import SpectraInputError

FORMAT = "compressed-tensors"
CONTAINERS = (4, 8)  # the int widths vLLM's and transformers' kernels take


def require_package():
    try:
        import compressed_tensors
    except ImportError as e:
        raise SpectraInputError(
            "--format compressed-tensors needs the compressed-tensors package: "
            'pip install -e ".[export]"'
        ) from e
    return compressed_tensors


def signed_codes(f) -> torch.Tensor:
    """Our codes as signed integers on our scale: code - zero point (int16)."""
    per_col = torch.arange(f.shape[1]) // f.group_size
    return f.codes.to(torch.int16) - f.zeros[:, per_col].round().to(torch.int16)


def container(f) -> tuple[int | None, str | None]:
    """(int width that holds `f` exactly, note) or (None, why it is written dense): its
    method says why, or that a grid of codes, scales and zero points holds it."""
    from compressors.registry import method_of_factorization

    method = method_of_factorization(f)
    why = None if method is None else method.exports.get(FORMAT)
    if why is None:
        return None, f"{type(f).__name__}: no compressed-tensors format"
    reason = why(f) if callable(why) else why
    if reason is not None:
        return None, reason
    z = f.zeros.to(torch.float64)
    if not torch.equal(z, z.round()):
        return None, "zero points off the integer grid"
    if f.symmetric:
        lo, hi = -(2 ** (f.nbits - 1)), 2 ** (f.nbits - 1) - 1
    else:
        lo, hi = -(2**f.nbits - 1), 2**f.nbits - 1
    for bits in CONTAINERS:
        if -(2 ** (bits - 1)) <= lo and hi <= 2 ** (bits - 1) - 1:
            if bits == f.nbits and f.symmetric:
                return bits, None
            grid = "symmetric" if f.symmetric else "asymmetric"
            return bits, f"{grid} {f.nbits}-bit grid held exactly in int{bits}"
    return None, f"asymmetric {f.nbits}-bit grid: no signed int8 holds it"


def export_group(f) -> int:
    """The group size compressed-tensors stores: ours, or gcd(ours, columns) when ours
    does not divide the row (scales then repeat)."""
    n = f.shape[1]
    return f.group_size if n % f.group_size == 0 else math.gcd(f.group_size, n)


def packed_tensors(f, bits: int, dtype) -> dict[str, torch.Tensor]:
    """The module's pack-quantized tensors (local names): exactly our codes and scales."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    m, n = f.shape
    group = export_group(f)
    ours = torch.arange(0, n, group) // f.group_size  # our group of each exported group
    return {
        "weight_packed": pack_to_int32(signed_codes(f).to(torch.int8), bits),
        "weight_scale": f.scales[:, ours].to(dtype).contiguous(),
        "weight_shape": torch.tensor([m, n]),
    }


def scheme_of(bits: int, group: int, targets: list[str]):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    return QuantizationScheme(
        targets=targets,
        weights=QuantizationArgs(
            num_bits=bits, type="int", symmetric=True, strategy="group", group_size=group
        ),
        format="pack-quantized",
    )


def write(tmp: Path, src, tokenizer, dtype) -> list[dict]:
    """Write the checkpoint into `tmp` from `src` (spectra.export.source), one shard per
    part: (one summary row per compressed module, the bytes its compressed modules'
    weights take against their fp16 size)."""
    require_package()
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, QuantizationStatus
    from safetensors.torch import save_file

    from compressors import width_model
    from spectra.export import compact_hf
    from spectra.export.source import cast, shard_names, write_index

    rows, groups, width = [], defaultdict(list), {}
    fp16, compressed = 0, set(src.compressed())
    for name in src.compressed():
        f = src.factorization(name)
        bits, note = container(f)
        kind = type(src.module(name)).__name__
        if bits is not None and not isinstance(src.module(name), torch.nn.Linear):
            bits, note = None, f"{kind}: compressed-tensors quantizes nn.Linear only"
        if bits is not None:
            width[name] = bits
            groups[(bits, export_group(f))].append(name)
        stored = "dense" if bits is None else f"pack-quantized int{bits}"
        rows.append(dict(module=name, stored=stored, reason=note))
        fp16 += 2 * f.shape[0] * f.shape[1]
        del f
    blocks = getattr(src, "blocks", None)  # width's per-block widths: DeciLM's layout
    parts = [width_model.kept(part, blocks) for part in src.parts()]
    files = shard_names(parts)
    weight_map, total, stored = {}, 0, 0
    for file, names in zip(files, parts, strict=True):
        state = {}
        for k in names:
            owner, _, attr = k.rpartition(".")
            if owner in width and attr == "weight":
                f = src.factorization(owner)
                for local, t in packed_tensors(f, width[owner], dtype).items():
                    state[f"{owner}.{local}"] = t
                continue
            state[k] = cast(src.value(k), dtype).contiguous()
        save_file(state, tmp / file, metadata={"format": "pt"})
        for k, t in state.items():
            weight_map[k] = file
            total += t.numel() * t.element_size()
            owner, _, attr = k.rpartition(".")
            if owner in compressed and attr != "bias":
                stored += t.numel() * t.element_size()
        del state
    write_index(tmp, weight_map, total)
    if blocks:  # DeciLM's block_configs, with the modeling file transformers needs
        compact_hf.write_config(tmp, src, dtype, {}, blocks)
    else:
        config = json.loads(src.config.to_json_string())
        config["dtype"] = str(dtype).removeprefix("torch.")
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    if groups:
        qc = QuantizationConfig(
            config_groups={
                f"group_{i}": scheme_of(bits, group, names)
                for i, ((bits, group), names) in enumerate(sorted(groups.items()))
            },
            format="pack-quantized",
            quantization_status=QuantizationStatus.COMPRESSED,
        )
        ModelCompressor(quantization_config=qc).update_config(str(tmp))
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    return rows, dict(compressed_bytes=stored, compressed_fp16_bytes=fp16)
