"""Model sources, lazy weights, roles and blocks."""

import json

import numpy as np
import pytest
import torch

from spectra.errors import SpectraInputError
from spectra.io import models, roles
from spectra.io.model import matrices, open_model, weights


def test_tiny_llama_matrices_and_weights_match_state_dict(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    state = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).state_dict()
    got = dict(weights(models.resolve(str(tiny_llama_dir))))
    two_d = {k.removesuffix(".weight") for k, v in state.items() if v.ndim == 2}
    assert set(got) == two_d  # 2 blocks x 7 linears + embed + lm_head
    assert len(got) == 16
    for name, t in got.items():
        torch.testing.assert_close(t, state[name + ".weight"], rtol=0, atol=0)
    mats = {m.name: m for m in open_model(str(tiny_llama_dir)).matrices}
    assert mats["model.layers.1.mlp.down_proj"].role == "down"
    assert mats["model.layers.1.mlp.down_proj"].block == 1
    assert mats["model.layers.0.self_attn.k_proj"].shape == (32, 64)
    assert mats["model.embed_tokens"].block is None and mats["lm_head"].role == "lm_head"


def test_sharded_checkpoint_reads_the_same(tiny_llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    model.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("*.safetensors"))) > 2
    a = dict(weights(models.resolve(str(tiny_llama_dir))))
    b = dict(weights(models.resolve(str(tmp_path))))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def test_bf16_and_fp16_are_widened_exactly(tmp_path):
    from safetensors.torch import save_file

    x = torch.randn(8, 6)
    save_file({"a.weight": x.bfloat16(), "b.weight": x.half()}, tmp_path / "model.safetensors")
    got = dict(weights(models.resolve(str(tmp_path))))
    torch.testing.assert_close(got["a"], x.bfloat16().float(), rtol=0, atol=0)
    torch.testing.assert_close(got["b"], x.half().float(), rtol=0, atol=0)


def test_gpt2_conv1d_is_transposed(tiny_gpt2_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir)
    mats = {m.name: m for m in open_model(str(tiny_gpt2_dir)).matrices}
    c_attn = mats["transformer.h.0.attn.c_attn"]
    assert c_attn.role == "qkv" and c_attn.shape == (96, 32) and c_attn.transposed
    np.testing.assert_array_equal(
        c_attn.read(), model.transformer.h[0].attn.c_attn.weight.detach().numpy().T
    )
    assert mats["transformer.h.1.mlp.c_fc"].shape == (128, 32)
    assert mats["transformer.h.1.mlp.c_proj"].role == "down"
    assert mats["transformer.h.1.attn.c_proj"].role == "o"
    assert mats["transformer.wte"].role == "embed" and not mats["transformer.wte"].transposed


@pytest.mark.parametrize(
    "name,role,block",
    [
        ("model.layers.3.self_attn.q_proj", "q", 3),  # Llama, Mistral, Qwen2, Gemma
        ("model.layers.3.self_attn.k_proj", "k", 3),
        ("model.layers.3.self_attn.v_proj", "v", 3),
        ("model.layers.3.self_attn.o_proj", "o", 3),
        ("model.layers.11.mlp.gate_proj", "gate", 11),
        ("model.layers.11.mlp.up_proj", "up", 11),
        ("model.layers.11.mlp.down_proj", "down", 11),
        ("model.embed_tokens", "embed", None),
        ("lm_head", "lm_head", None),
        ("transformer.h.4.attn.c_attn", "qkv", 4),  # GPT-2
        ("h.4.attn.c_proj", "o", 4),
        ("transformer.h.4.mlp.c_fc", "up", 4),
        ("transformer.h.4.mlp.c_proj", "down", 4),
        ("transformer.wpe", "embed", None),
        ("model.decoder.layers.2.self_attn.out_proj", "o", 2),  # OPT
        ("model.decoder.layers.2.fc1", "up", 2),
        ("model.decoder.layers.2.fc2", "down", 2),
        ("model.decoder.embed_positions", "embed", None),
        ("model.layers.5.self_attn.dense", "o", 5),  # Phi-1/2
        ("model.layers.5.mlp.fc1", "up", 5),
        ("model.layers.5.self_attn.qkv_proj", "qkv", 5),  # Phi-3
        ("model.layers.5.mlp.gate_up_proj", "gate_up", 5),
        ("model.layers.5.input_layernorm", "other", 5),
    ],
)
def test_roles_and_blocks(name, role, block):
    assert roles.role_of(name) == role
    assert roles.block_of(name) == block


def test_load_gives_the_same_model(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    model = open_model(str(tiny_llama_dir), "cpu", "float32", "none").load()
    ids = torch.tensor([[1, 5, 9, 3]])
    torch.testing.assert_close(model(ids).logits, ref(ids).logits)


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda p: p / "missing", "no such model"),
        (lambda p: p, "no safetensors weights"),
        (lambda p: _write(p / "model.safetensors", b"\x10\x00"), "not a safetensors file"),
        (lambda p: _write(p / "model.safetensors", b"\xff" * 64), "corrupt"),
        (lambda p: _write(p / "x.gguf", b"NOPE" + b"\0" * 60), "not a GGUF file"),
        (
            lambda p: _write(p / "x.gguf", b"GGUF" + b"\x03\0\0\0" + b"\xff" * 40),
            "corrupt GGUF header",
        ),
        (lambda p: _write(p / "weights.txt", b"hi"), "not a model directory"),
    ],
    ids=["missing", "empty-dir", "short", "garbage", "gguf-magic", "gguf-garbage", "txt"],
)
def test_bad_sources_raise_input_errors(tmp_path, make, match):
    target = make(tmp_path)
    with pytest.raises(SpectraInputError, match=match):
        matrices(models.resolve(str(target)))


def test_truncated_safetensors_is_detected(tiny_llama_dir, tmp_path):
    data = (tiny_llama_dir / "model.safetensors").read_bytes()
    _write(tmp_path / "model.safetensors", data[: len(data) // 2])
    with pytest.raises(SpectraInputError, match="truncated"):
        matrices(models.resolve(str(tmp_path)))


def test_missing_shard_is_named(tmp_path):
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a.weight": "model-00001-of-00002.safetensors"}})
    )
    with pytest.raises(SpectraInputError, match="model-00001-of-00002"):
        matrices(models.resolve(str(tmp_path)))


def test_hub_id_offline_is_an_input_error():
    with pytest.raises(SpectraInputError, match="hub"):
        models.resolve("someone/some-model")


@pytest.mark.demo
def test_demo_converts_once_with_its_shape(demo_dir):
    mats = open_model("demo").matrices
    assert len(mats) == 211  # 30 blocks x 7 linears + the embedding (lm_head is tied)
    # 134.5M parameters in all; the 61 RMSNorm vectors (35,136) are not matrices
    assert sum(m.shape[0] * m.shape[1] for m in mats) == 134_515_008 - 61 * 576
    config = json.loads((demo_dir / "config.json").read_text())
    assert "quantization_config" not in config and config["num_hidden_layers"] == 30
    assert (demo_dir / "tokenizer.json").is_file()


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("dtype", ["F64", "F32", "F16", "BF16"])
@pytest.mark.parametrize("shape", [(3, 5), (64, 64), (1000, 37), (4097, 9)])
def test_in_place_widening_read_equals_a_plain_read(tmp_path, dtype, shape):
    from safetensors.torch import save_file

    from spectra.io.tensors import read_header

    torch_dtype = {
        "F64": torch.float64,
        "F32": torch.float32,
        "F16": torch.float16,
        "BF16": torch.bfloat16,
    }[dtype]
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1)).to(torch_dtype)
    save_file({"big.weight": torch.randn(300, 300), "w.weight": x}, tmp_path / "m.safetensors")
    refs = {r.name: r for r in read_header(tmp_path / "m.safetensors")}
    refs["big.weight"].read_float()  # leaves a larger, dirty scratch buffer behind
    hashes = {}
    got = refs["w.weight"].read_float(hashes)
    assert got.dtype == (np.float64 if dtype == "F64" else np.float32)
    np.testing.assert_array_equal(got, x.double().numpy())
    assert len(hashes["w.weight"]) == 32
    fresh = refs["w.weight"].read()  # its own array, widened in place too
    assert fresh.dtype == np.float32 and not np.shares_memory(fresh, got)
    np.testing.assert_array_equal(fresh, x.float().numpy())


def test_tensor_hashes_in_pieces_are_the_one_shot_hashes(tmp_path, monkeypatch):
    """The checkpoint's content hashes (its cache key) are read 64 MB at a time; the
    digest is the one of the whole tensor's bytes, whatever the piece size."""
    from safetensors.torch import save_file

    from spectra.io import cache
    from spectra.io.tensors import read_header

    g = torch.Generator().manual_seed(2)
    save_file({"a": torch.randn(301, 7, generator=g), "b": torch.randn(3, generator=g)},
              tmp_path / "m.safetensors")  # fmt: skip
    refs = read_header(tmp_path / "m.safetensors")
    want = {r.name: cache.hash_bytes(r.read_bytes()) for r in refs}
    monkeypatch.setattr(cache, "PIECE", 1000)  # 301 x 7 x 4 bytes: 9 pieces
    monkeypatch.setattr(cache, "memoized_hashes", lambda *a: None)
    monkeypatch.setattr(cache, "store_hashes", lambda *a: None)
    assert cache.file_tensor_hashes(tmp_path / "m.safetensors", refs) == want


@pytest.mark.demo
@pytest.mark.slow
def test_a_gguf_file_path_is_converted_once_into_the_cache(demo_dir, isolated_cache):
    gguf = models.demo_gguf()
    source = models.resolve(str(gguf))
    assert source.kind == "gguf" and source.root.parent == isolated_cache / "models"
    assert (source.root / ".complete").is_file() and (source.root / "tokenizer.json").is_file()
    names = [m.name for m in matrices(source)]
    assert names == [m.name for m in open_model("demo").matrices]
    t0 = __import__("time").perf_counter()
    assert models.resolve(str(gguf)).root == source.root  # second time: no conversion
    assert __import__("time").perf_counter() - t0 < 1.0
