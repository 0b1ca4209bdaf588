"""A GGUF file of the reconstructed model, for llama.cpp and what is built on it.

A `quant` module whose grid is one of llama.cpp's 32-weight block types keeps its own
codes: symmetric 4-bit as Q4_0, symmetric 8-bit as Q8_0, asymmetric 4-bit as Q4_1
(groups of 32; the grid's scales are float16 values, so Q4_0 and Q8_0 hold it bit for
bit, and Q4_1's minimum, -zero x scale, is rounded to float16). Every other compressed
module is reconstructed (GGUF has no factorized or sparse forms; a grid no block type
holds is requantized, and the summary says why), and every other 2-D weight is written
in the asked type (F16, Q8_0 or Q4_0, quantized by the gguf package's own quantizers; a
row whose width is not a multiple of the 32-weight block falls back to F16), 1-D
tensors (norms, biases) in F32 as llama.cpp's converter writes them.

Metadata: a GGUF source (the demo, a .gguf file) has its own key-values carried over,
tokenizer included, and its tensor names and order. A Hugging Face Llama, Mistral or
Qwen2 source gets the keys llama.cpp's converter writes for that architecture (sizes,
heads, rope, norm epsilon) and its tokenizer from tokenizer.json (BPE) or
tokenizer.model (SentencePiece) through the gguf package's vocab readers. Llama's
converter reorders the rows of q_proj and k_proj for its rotary layout (the two
halves of each head interleaved); we do the same, and transformers' GGUF loader undoes
it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from compressors.quant import gguf_block, gguf_reason
from spectra.errors import SpectraInputError

FILE = "model.gguf"
HF_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}  # model_type -> GGUF arch
PERMUTED = ("llama", "deci")  # architectures whose q/k rows llama.cpp's converter reorders
# width's per-block widths go into llama.cpp's Deci architecture (per-layer head and
# feed-forward counts, 0 for a removed sublayer: what its Nemotron-NAS converter writes)
PER_BLOCK_ARCH = "deci"
EMBEDDINGS = ("token_embd.weight", "output.weight")  # --gguf-embedding-type's tensors
SKIP_KEYS = ("GGUF.", "general.file_type", "general.quantization_version", "split.")


def write(tmp: Path, out: Path, src, tokenizer, gguf_type: str, embedding_type=None):
    """Write tmp/model.gguf from `src` (spectra.export.source): the tensor infos first,
    then each tensor computed, encoded and written in turn (one held at a time); one
    summary row per compressed module. Dense matrices are `gguf_type`, the token
    embedding and output head `embedding_type` (default: the same)."""
    import logging

    import gguf

    from compressors import width_model

    logging.getLogger("gguf").setLevel(logging.ERROR)  # vocab readers' chatter
    qtype = gguf.GGMLQuantizationType[gguf_type]
    etype = gguf.GGMLQuantizationType[embedding_type or gguf_type]
    config = src.config
    source = _gguf_source(out)
    if source is not None:
        reader = gguf.GGUFReader(source)
        arch = reader.fields["general.architecture"].contents()
    else:
        arch = HF_ARCH.get(config.model_type)
        if arch is None:
            raise SpectraInputError(
                f"--format gguf: {config.model_type} models are not supported "
                f"(Llama, Mistral, Qwen2 or a GGUF source)"
            )
    widths = getattr(src, "blocks", None)  # width's per-block widths (None: one width)
    arch_in, arch = arch, (PER_BLOCK_ARCH if widths else arch)
    writer = gguf.GGUFWriter(tmp / FILE, arch)
    if source is not None:
        _copy_metadata(writer, reader, arch_in, arch)
        _sizes(writer, config, widths)  # width may have changed them
    else:
        _hf_metadata(writer, config, out, widths)
    writer.add_file_type(_file_type(gguf, gguf_type))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    names = _gguf_names(gguf, arch, config, width_model.kept(src.names, widths))
    order = [t.name for t in reader.tensors] if source is not None else list(names.values())
    by_gguf = {g: h for h, g in names.items()}
    # a block tensor of the source that the model no longer has (width removed it)
    order = [g for g in order if g in by_gguf or not g.startswith("blk.")]
    copied = {t.name: t for t in reader.tensors} if source is not None else {}
    fallback = []
    # quant modules whose grid is a GGUF block type: written with their own codes
    native = {}
    for module in src.compressed():
        block = gguf_block(src.grid(module))
        if block is not None:
            native[f"{module}.weight"] = gguf.GGMLQuantizationType[block]
    for gname in order:  # a tensor transformers does not keep (e.g. rope_freqs): copied
        t = copied[gname] if by_gguf.get(gname) is None else None
        if t is not None:
            writer.add_tensor_info(gname, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
            continue
        shape = src.shape(by_gguf[gname])
        want = etype if gname in EMBEDDINGS else qtype
        dtype = native.get(by_gguf[gname]) or _encoded_type(gguf, shape, want)
        if dtype != want and len(shape) == 2 and by_gguf[gname] not in native:
            fallback.append(gname)
        if dtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            np_dtype = np.float32 if dtype == gguf.GGMLQuantizationType.F32 else np.float16
            nbytes = int(np.prod(shape)) * np.dtype(np_dtype).itemsize
            writer.add_tensor_info(gname, shape, np.dtype(np_dtype), nbytes, dtype)
        else:
            raw = gguf.quant_shape_to_byte_shape(shape, dtype)
            nbytes = int(np.prod(raw))
            writer.add_tensor_info(gname, raw, np.dtype(np.uint8), nbytes, dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for gname in order:
        hname = by_gguf.get(gname)
        if hname is None:
            writer.write_tensor_data(copied[gname].data)
            continue
        heads = None
        if arch in PERMUTED and hname.endswith(("q_proj.weight", "k_proj.weight")):
            heads = config.num_attention_heads
            if hname.endswith("k_proj.weight"):
                heads = _kv_heads(config, widths, hname)
        if hname in native:
            f = src.factorization(hname.removesuffix(".weight"))
            data = blocks(f, native[hname].name)
            writer.write_tensor_data(data if heads is None else rotary_rows(data, heads))
            continue
        w = src.value(hname).detach().to(torch.float32).numpy()
        if heads is not None:
            w = rotary_rows(w, heads)
        writer.write_tensor_data(_encode(gguf, w, etype if gname in EMBEDDINGS else qtype)[0])
        del w
    writer.close()
    note = None if not fallback else f"{len(fallback)} tensors in F16 (rows not in 32-blocks)"
    rows = []
    for n in src.compressed():
        block = native.get(f"{n}.weight")
        if block is not None:
            rows.append(dict(module=n, stored=f"{block.name}, its own codes", reason=None))
            continue
        grid = src.grid(n)
        why = gguf_reason(grid) if grid is not None else note
        rows.append(dict(module=n, stored=f"dense {gguf_type}", reason=why))
    return rows


def blocks(f, kind: str) -> np.ndarray:
    """A scalar grid's codes as llama.cpp's blocks of 32 weights, (rows, bytes): Q8_0 is
    a float16 scale d and 32 int8 q (w = d q); Q4_0 is d and 16 bytes of 4-bit q, the
    block's first 16 weights in the low nibbles and its last 16 in the high ones
    (w = d (q - 8)); Q4_1 is d, a float16 minimum m and the same nibbles (w = d q + m).
    Our symmetric codes are offset by 2^(bits-1), so Q4_0's and Q8_0's q are exactly
    them; Q4_1's m is -zero x scale, rounded to float16."""
    codes = f.codes.numpy().astype(np.int16)
    m, n = codes.shape
    g = n // 32
    c = codes.reshape(m, g, 32)
    scales = f.scales.to(torch.float32).numpy()
    d = scales.astype(np.float16).reshape(m, g, 1).view(np.uint8)
    if kind == "Q8_0":
        q = (c - 128).astype(np.int8).view(np.uint8)
        return np.concatenate([d, q], axis=-1).reshape(m, g * 34)
    nibbles = (c[..., :16] | (c[..., 16:] << 4)).astype(np.uint8)
    if kind == "Q4_0":
        return np.concatenate([d, nibbles], axis=-1).reshape(m, g * 18)
    zeros = f.zeros.to(torch.float32).numpy()
    low = (-zeros * scales).astype(np.float16).reshape(m, g, 1).view(np.uint8)
    return np.concatenate([d, low, nibbles], axis=-1).reshape(m, g * 20)


def _encoded_type(gguf, shape, qtype):
    """The type `_encode` gives a tensor of `shape`."""
    if len(shape) < 2:
        return gguf.GGMLQuantizationType.F32
    if qtype == gguf.GGMLQuantizationType.F16:
        return qtype
    if shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]:
        return gguf.GGMLQuantizationType.F16
    return qtype


def rotary_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's row order for q/k: within each head, the first and second halves of
    the rotary pairs interleaved (the inverse of what transformers' GGUF loader does)."""
    rows = w.shape[0]
    return w.reshape(heads, 2, rows // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _encode(gguf, w: np.ndarray, qtype):
    """(data, type): 1-D tensors F32; 2-D in qtype, F16 when rows are not whole blocks."""
    if w.ndim < 2:
        return w.astype(np.float32), gguf.GGMLQuantizationType.F32
    if qtype == gguf.GGMLQuantizationType.F16:
        return w.astype(np.float16), qtype
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if w.shape[-1] % block:
        return w.astype(np.float16), gguf.GGMLQuantizationType.F16
    return gguf.quants.quantize(w, qtype), qtype


def _file_type(gguf, gguf_type: str) -> int:
    return {
        "F16": gguf.LlamaFileType.MOSTLY_F16,
        "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
        "Q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
    }[gguf_type]


def _gguf_names(gguf, arch: str, config, state) -> dict[str, str]:
    """HF state-dict name -> GGUF tensor name, for every tensor that has one."""
    arch_id = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[arch]
    blocks = config.num_hidden_layers
    table = gguf.get_tensor_name_map(arch_id, blocks)
    out = {}
    for name in state:
        g = table.get_name(name, try_suffixes=(".weight", ".bias"))
        if g is not None:
            out[name] = g
    if getattr(config, "tie_word_embeddings", False):  # llama.cpp reuses token_embd
        out = {h: g for h, g in out.items() if not g.startswith("output.")}
    return out


def _gguf_source(out: Path) -> Path | None:
    """The .gguf file OUT was compressed from (the demo or a .gguf path), if any."""
    from spectra.io import models

    try:
        spec = json.loads((out / "report.json").read_text()).get("model")
        source = models.resolve(spec)
    except (OSError, ValueError, SpectraInputError, TypeError):
        return None
    if source.kind not in ("demo", "gguf"):
        return None
    path = models.conversion_info(source).get("gguf")
    return Path(path) if path and Path(path).is_file() else None


def _kv_heads(config, blocks, name: str) -> int:
    """The key/value heads of the block `name` is in."""
    from spectra.io.roles import block_of

    if blocks:
        return blocks[block_of(name)]["kv_heads"]
    return getattr(config, "num_key_value_heads", None) or config.num_attention_heads


def _sizes(writer, config, blocks) -> None:
    """Blocks, feed-forward length and heads: one value each, or per block (width)."""
    heads = config.num_attention_heads
    writer.add_block_count(config.num_hidden_layers)
    if blocks:
        writer.add_feed_forward_length([b["ffn"] for b in blocks])
        writer.add_head_count([heads if b["kv_heads"] else 0 for b in blocks])
        writer.add_head_count_kv([b["kv_heads"] for b in blocks])
        return
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or heads)


SIZE_KEYS = (
    "block_count",
    "feed_forward_length",
    "attention.head_count",
    "attention.head_count_kv",
)


def _copy_metadata(writer, reader, arch_in: str, arch: str) -> None:
    """The source's key-values, its architecture's keys under `arch`, without the sizes
    (`_sizes` writes them)."""
    from gguf import GGUFValueType

    sizes = {f"{arch_in}.{k}" for k in SIZE_KEYS} | {"general.architecture"}
    for key, field in reader.fields.items():
        if key.startswith(SKIP_KEYS) or not field.types or key in sizes:
            continue
        if key.startswith(arch_in + "."):
            key = arch + key[len(arch_in) :]
        vtype = field.types[0]
        sub = field.types[-1] if vtype == GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), vtype, sub_type=sub)


def _hf_metadata(writer, config, out: Path, blocks=None) -> None:
    """The keys llama.cpp's converter writes for a Llama/Mistral/Qwen2 checkpoint."""
    import gguf

    writer.add_name(Path(out).name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    _sizes(writer, config, blocks)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_rope_dimension_count(head_dim)
    rope = getattr(config, "rope_parameters", None) or {}
    theta = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    writer.add_rope_freq_base(float(theta))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(config.vocab_size)
    vocab = _vocab(gguf, out)
    tokens, scores, types = [], [], []
    for text, score, kind in vocab.all_tokens():
        if len(tokens) == config.vocab_size:  # added tokens past the embedding: no row
            break
        tokens.append(text)
        scores.append(score)
        types.append(kind)
    for i in range(len(tokens), config.vocab_size):  # embedding rows past the tokenizer
        tokens.append(f"[PAD{i}]".encode())
        scores.append(-1000.0)
        types.append(gguf.TokenType.UNUSED)
    writer.add_tokenizer_model(vocab.tokenizer_model)
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(out, load_merges=vocab.tokenizer_model == "gpt2")
    special.special_token_ids = {
        k: i for k, i in special.special_token_ids.items() if i < config.vocab_size
    }
    special.add_to_gguf(writer, True)


def _vocab(gguf, out: Path):
    for cls in (gguf.vocab.BpeVocab, gguf.vocab.LlamaHfVocab, gguf.vocab.SentencePieceVocab):
        try:
            return cls(out)
        except (FileNotFoundError, TypeError, ValueError, KeyError):
            continue
    raise SpectraInputError(f"{out}: no tokenizer that GGUF can hold (tokenizer.json or .model)")
