"""`spectra export`: compressed-tensors, GGUF and hf exports, read back by the real
libraries (transformers in a fresh process that never imports spectra, the gguf
package's reader, transformers' GGUF loader)."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from spectra.cli import main

IDS = list(range(2, 60))
QUANT = r"re:model\.layers\.\d+\.self_attn\.[qkv]_proj"
PLAN = {
    "version": 1,
    "rules": [
        # 64 columns; group 48 does not divide them: exported at gcd(48, 64) = 16
        {
            "targets": [r"re:model\.layers\.0\.self_attn\.q_proj"],
            "method": "quant",
            "bits": 4,
            "group_size": 48,
            "symmetric": True,
        },
        {
            "targets": [r"re:model\.layers\.1\.self_attn\.q_proj"],
            "method": "quant",
            "bits": 8,
            "group_size": 32,
            "symmetric": True,
        },
        {
            "targets": [r"re:model\.layers\.\d+\.self_attn\.k_proj"],
            "method": "quant",
            "bits": 3,
            "group_size": 32,
        },  # asymmetric 3-bit: held exactly in int4
        {
            "targets": [r"re:model\.layers\.\d+\.self_attn\.v_proj"],
            "method": "quant",
            "bits": 4,
            "group_size": 64,
        },  # asymmetric 4-bit: held exactly in int8
        {
            "targets": [r"re:model\.layers\.\d+\.self_attn\.o_proj"],
            "method": "prune",
            "pattern": "2:4",
        },
        {"targets": [r"re:model\.layers\.\d+\.mlp\.(gate|up)_proj"], "method": "joint", "rank": 8},
        {
            "targets": [r"re:model\.layers\.\d+\.mlp\.down_proj"],
            "method": "quant",
            "bits": 8,
            "group_size": 32,
        },  # asymmetric 8-bit: no int8 holds it: dense
    ],
}

# a fresh interpreter: plain transformers (+ compressed-tensors), never spectra
READ_BACK = """
import sys, torch
from transformers import AutoModelForCausalLM
kw = {"gguf_file": sys.argv[3]} if len(sys.argv) > 3 else {}
model = AutoModelForCausalLM.from_pretrained(
    sys.argv[1], dtype=torch.float32, trust_remote_code=True, **kw
).eval()
with torch.no_grad():
    logits = model(torch.tensor([IDS])).logits
assert "spectra" not in sys.modules and "compressors" not in sys.modules
torch.save(logits, sys.argv[2])
""".replace("IDS", str(IDS))


def read_back(tmp_path, path, gguf_file=None):
    script = tmp_path / "read_back.py"
    script.write_text(READ_BACK)
    out = tmp_path / "logits.pt"
    args = [sys.executable, str(script), str(path), str(out)] + ([gguf_file] if gguf_file else [])
    r = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return torch.load(out)


def ours(out):
    import spectra

    with torch.no_grad():
        return spectra.load_compressed(out)(torch.tensor([IDS])).logits


def rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture(scope="module")
def applied(family_dir, tmp_path_factory):
    """family -> a `spectra apply` output of PLAN on that tiny family."""
    made = {}

    def make(family):
        if family not in made:
            tmp = tmp_path_factory.mktemp(f"applied-{family}")
            plan = tmp / "plan.yaml"
            plan.write_text(yaml.safe_dump(PLAN))
            out = tmp / "out"
            assert main(["apply", plan, "--model", family_dir(family), "-o", out]) == 0
            made[family] = out
        return made[family]

    return make


def apply_rules(model, tmp_path, *rules):
    """`spectra apply` of a plan of `rules` on `model` into tmp_path/out."""
    plan = tmp_path / "plan.yaml"
    plan.write_text(yaml.safe_dump({"version": 1, "rules": list(rules)}))
    out = tmp_path / "out"
    assert main(["apply", plan, "--model", model, "-o", out]) == 0
    return out


def export(capsys, out, fmt, dest, *extra):
    capsys.readouterr()  # whatever came before (a module fixture's apply) is not ours
    assert main(["export", out, "--format", fmt, "-o", dest, "--json", *extra]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_compressed_tensors_loads_in_plain_transformers(family, applied, tmp_path, capsys):
    out = applied(family)
    summary = export(capsys, out, "compressed-tensors", tmp_path / "ct", "--dtype", "float32")
    stored = {r["module"]: r["stored"] for r in summary["modules"]}
    assert stored["model.layers.0.self_attn.q_proj"] == "pack-quantized int4"
    assert stored["model.layers.1.self_attn.q_proj"] == "pack-quantized int8"
    assert stored["model.layers.0.self_attn.k_proj"] == "pack-quantized int4"
    assert stored["model.layers.0.self_attn.v_proj"] == "pack-quantized int8"
    for dense in ("self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj"):
        assert stored[f"model.layers.0.{dense}"] == "dense"
    config = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["format"] == "pack-quantized"
    assert rel(read_back(tmp_path, tmp_path / "ct"), ours(out)) < 1e-4
    assert not list(tmp_path.glob(".ct.*"))  # no temporary left beside DIR


def test_packed_codes_decompress_to_our_codes(applied, tmp_path, capsys):
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    from compressed_tensors.quantization import QuantizationConfig
    from safetensors.torch import load_file

    from compressors import io
    from spectra.export import ctensors

    out = applied("llama")
    export(capsys, out, "compressed-tensors", tmp_path / "ct", "--dtype", "float32")
    tensors = load_file(tmp_path / "ct" / "model.safetensors")
    qc = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    schemes = QuantizationConfig.model_validate(qc).config_groups.values()
    facts = io.load(out)[1]
    checked = 0
    for scheme in schemes:
        for name in scheme.targets:
            f = facts[name]
            local = {k.rsplit(".", 1)[1]: v for k, v in tensors.items() if k.startswith(name + ".")}
            codes = unpack_from_int32(local["weight_packed"], scheme.weights.num_bits, f.shape)
            assert torch.equal(codes.to(torch.int16), ctensors.signed_codes(f))
            w = PackedQuantizationCompressor.decompress(local, scheme)["weight"]
            assert torch.allclose(w, f.to_dense().to(w.dtype), rtol=0, atol=1e-6)
            checked += 1
    assert checked == 6  # q, k, v of both blocks


def test_gpt2_conv1d_is_written_dense_with_the_reason(family_dir, tmp_path, capsys):
    rule = {"targets": [r"re:transformer\.h\.\d+\.mlp\.c_fc"], "method": "quant"}
    rule.update(bits=4, group_size=32, symmetric=True)
    out = apply_rules(family_dir("gpt2"), tmp_path, rule)
    summary = export(capsys, out, "compressed-tensors", tmp_path / "ct", "--dtype", "float32")
    assert {r["reason"] for r in summary["modules"]} == {
        "Conv1D: compressed-tensors quantizes nn.Linear only"
    }
    assert rel(read_back(tmp_path, tmp_path / "ct"), ours(out)) < 1e-5


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("kind,tol", [("F16", 3e-3), ("Q8_0", 3e-2)])
def test_gguf_from_a_hf_source_reads_back(family, kind, tol, applied, tmp_path, capsys):
    import gguf

    out = applied(family)
    summary = export(capsys, out, "gguf", tmp_path / "gg", "--gguf-type", kind)
    assert summary["files"] == {"model.gguf": summary["bytes"]}
    reader = gguf.GGUFReader(tmp_path / "gg" / "model.gguf")
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    vectors = {t.name for t in reader.tensors if len(t.shape) == 1}  # norms, qwen2's biases
    assert vectors and {types[n] for n in vectors} == {"F32"}
    native = {"blk.1.attn_q.weight": "Q8_0"}  # symmetric 8-bit in groups of 32: its codes
    assert {n: types[n] for n in native} == native
    assert {types[n] for n in types if n not in vectors | set(native)} == {kind}
    stored = {r["module"]: r["stored"] for r in summary["modules"]}
    assert stored["model.layers.1.self_attn.q_proj"] == "Q8_0, its own codes"
    assert reader.fields["general.architecture"].contents() == family
    logits = read_back(tmp_path, tmp_path / "gg", "model.gguf")
    assert rel(logits, ours(out)) < tol
    # the tokenizer travels too: its vocabulary, and for llama (whose GGUF reader keeps
    # the byte-level pre-tokenizer; qwen2's imposes Qwen2's split) the same ids
    from transformers import AutoTokenizer

    source = AutoTokenizer.from_pretrained(out)
    theirs = AutoTokenizer.from_pretrained(tmp_path / "gg", gguf_file="model.gguf")
    vocab = {i: t for t, i in source.get_vocab().items() if i < 320}
    assert all(theirs.convert_ids_to_tokens(i) == t for i, t in vocab.items())
    text = "def f(x):\n    return x + 1  # the topics"
    if family == "llama":
        assert theirs(text).input_ids == source(text).input_ids


def test_rotary_rows_is_the_inverse_of_transformers_gguf_loader():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    from spectra.export.gguf_out import rotary_rows

    w = np.random.default_rng(0).standard_normal((48, 8)).astype(np.float32)
    undo = LlamaTensorProcessor.__new__(LlamaTensorProcessor)._reverse_permute_weights
    back = undo(rotary_rows(w, 6), 6, 6)
    assert np.array_equal(back, w)
    assert not np.array_equal(rotary_rows(w, 6), w)


def test_hf_export_keeps_low_rank_factorized(applied, tmp_path, capsys):
    """Joint's members are stored as their factors (A_i and the shared V^T) and run by the
    export's own modeling file in plain transformers: the OUT's logits, with the weights
    the plan says (every other module reconstructed dense, and named)."""
    from safetensors import safe_open

    out = applied("llama")
    summary = export(capsys, out, "hf", tmp_path / "hf")
    assert summary["dtype"] == "float32"
    stored = {r["module"]: (r["stored"], r["reason"]) for r in summary["modules"]}
    assert stored["model.layers.0.mlp.gate_proj"] == ("low rank, factors of rank 8", None)
    kind, why = stored["model.layers.0.self_attn.o_proj"]
    assert kind == "dense" and why == "prune: no compact form in the hf export (reconstructed)"
    names = set()
    for f in (tmp_path / "hf").glob("*.safetensors"):
        with safe_open(f, "pt") as st:
            names |= set(st.keys())
    assert {"model.layers.0.mlp.up_proj.a", "model.layers.0.mlp.up_proj.b"} <= names
    assert "model.layers.0.mlp.up_proj.weight" not in names
    assert rel(read_back(tmp_path, tmp_path / "hf"), ours(out)) < 1e-5
    # resident, it holds what the plan says: each factorized module r (m + n), not m n
    from compressors import io
    from spectra.io.model import open_model

    dense = io.reconstruct(*io.load(out))
    saved = sum(
        mod.weight.numel() - 8 * sum(mod.weight.shape)
        for name, mod in dense.named_modules()
        if name.endswith(("gate_proj", "up_proj"))
    )
    compact = open_model(str(tmp_path / "hf"), "cpu", "float32", "none").load()
    assert saved > 0
    assert (
        sum(p.numel() for p in compact.parameters())
        == sum(p.numel() for p in dense.parameters()) - saved
    )


def test_a_changed_modeling_file_is_never_run(applied, tmp_path, capsys, cli):
    """spectra trusts a compact export's remote code only when it is its own, verbatim."""
    export(capsys, applied("llama"), "hf", tmp_path / "hf")
    code = tmp_path / "hf" / "spectra_modeling.py"
    code.write_text(code.read_text() + "\nimport os  # anything else\n")
    r = cli("eval", tmp_path / "hf", "--max-tokens", "256", "--seqlen", "128")
    assert r.returncode == 2
    assert "spectra_modeling.py is not the one spectra writes; refusing to run it" in r.stderr


def test_eval_accepts_every_export(applied, tmp_path, capsys):
    out = applied("llama")
    ppl = {}
    for fmt in ("compressed-tensors", "gguf", "hf"):
        dest = tmp_path / fmt
        export(capsys, out, fmt, dest, *(["--gguf-type", "F16"] if fmt == "gguf" else []))
        args = ["eval", dest, "--max-tokens", "1024", "--seqlen", "128", "--json"]
        capsys.readouterr()
        assert main(args) == 0
        ppl[fmt] = json.loads(capsys.readouterr().out)["ppl"]
    assert (
        main(["eval", out, "--max-tokens", "1024", "--seqlen", "128", "--json", "--no-baseline"])
        == 0
    )
    source = json.loads(capsys.readouterr().out)["ppl"]
    assert abs(ppl["compressed-tensors"] / source - 1) < 1e-4
    assert abs(ppl["hf"] / source - 1) < 1e-5
    assert abs(ppl["gguf"] / source - 1) < 5e-3


def test_refusals_write_nothing(applied, family_dir, tmp_path, cli):
    out = applied("llama")
    cases = [
        (
            ["export", family_dir("llama"), "--format", "hf", "-o", tmp_path / "a"],
            "not a `spectra apply` output",
        ),
        (["export", out, "--format", "onnx", "-o", tmp_path / "b"], "invalid choice"),
        (
            ["export", out, "--format", "gguf", "--gguf-type", "Q2_K", "-o", tmp_path / "c"],
            "invalid choice",
        ),
        (["export", out, "--format", "hf", "-o", out / "inside"], "inside the source"),
    ]
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    cases.append((["export", out, "--format", "hf", "-o", tmp_path / "taken"], "already exists"))
    for args, words in cases:
        r = cli(*args)
        assert r.returncode == 2, (args, r.stderr)
        assert words in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "spectra-cache") == ["taken"]
    assert (tmp_path / "taken" / "keep.txt").read_text() == "mine"
    assert not (out / "inside").exists()


def test_gguf_refuses_an_architecture_it_cannot_describe(family_dir, tmp_path, cli):
    rule = {"targets": [r"re:model\.decoder\.layers\.\d+\.fc1"], "method": "lowrank"}
    out = apply_rules(family_dir("opt"), tmp_path, dict(rule, rank=4))
    r = cli("export", out, "--format", "gguf", "-o", tmp_path / "gg")
    assert r.returncode == 2 and "opt models are not supported" in r.stderr, r.stderr
    assert not (tmp_path / "gg").exists()
    r = cli("export", out, "--format", "hf", "-o", tmp_path / "hf", "--force")
    assert r.returncode == 0, r.stderr  # --force on a DIR that does not exist yet is fine


@pytest.mark.demo
@pytest.mark.slow
def test_demo_gguf_source_round_trips_f16(demo_dir, tmp_path, capsys):
    """A GGUF source keeps its own metadata; F16 gives back the weights within F16."""
    import gguf
    from transformers import AutoModelForCausalLM

    from compressors import io
    from spectra.io import models

    rule = {"targets": [r"re:model\.layers\.[0-3]\.self_attn\.[qk]_proj"], "method": "lowrank"}
    out = apply_rules("demo", tmp_path, dict(rule, rank=16))
    export(capsys, out, "gguf", tmp_path / "gg", "--gguf-type", "F16")
    source = gguf.GGUFReader(models.conversion_info(models.resolve("demo"))["gguf"])
    mine = gguf.GGUFReader(tmp_path / "gg" / "model.gguf")
    assert [t.name for t in mine.tensors] == [t.name for t in source.tensors]
    for key in ("llama.rope.freq_base", "tokenizer.ggml.tokens", "tokenizer.ggml.merges"):
        assert mine.fields[key].contents() == source.fields[key].contents()
    back = AutoModelForCausalLM.from_pretrained(
        tmp_path / "gg", gguf_file="model.gguf", dtype=torch.float32
    ).state_dict()
    model, facts = io.load(out)
    want = io.reconstruct(model, facts).state_dict()
    for name in (
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.2.self_attn.k_proj.weight",
        "model.layers.9.mlp.down_proj.weight",
        "model.embed_tokens.weight",
    ):
        assert torch.equal(back[name], want[name].half().float()), name


def test_gguf_q4_0_blocks_hold_the_reconstruction(applied, tmp_path, capsys):
    import gguf

    from compressors import io

    out = applied("llama")
    export(capsys, out, "gguf", tmp_path / "gg", "--gguf-type", "Q4_0")
    reader = gguf.GGUFReader(tmp_path / "gg" / "model.gguf")
    tensor = next(t for t in reader.tensors if t.name == "blk.1.ffn_down.weight")
    assert tensor.tensor_type.name == "Q4_0"
    got = gguf.quants.dequantize(tensor.data, tensor.tensor_type)  # (96 -> 64 rows, 96 cols)
    model, facts = io.load(out)
    want = io.reconstruct(model, facts).state_dict()["model.layers.1.mlp.down_proj.weight"]
    want = want.numpy().reshape(64, 3, 32)  # Q4_0 blocks of 32 along the row
    err = np.abs(got.reshape(64, 3, 32) - want).max(-1)
    # Q4_0: step d = absmax / 8; rounding costs d / 2, the clipped +absmax side up to d
    assert (err <= np.abs(want).max(-1) / 8 * 1.01).all()
    assert np.abs(got.reshape(64, 3, 32) - want).mean() < np.abs(want).mean() / 8
    assert err.max() > 0  # it is quantized, not copied


def test_gguf_embedding_type_sets_the_embedding_and_head_alone(applied, tmp_path, capsys):
    """`--gguf-embedding-type Q8_0` beside `--gguf-type Q4_0`: token_embd (and an untied
    output head) in Q8_0, every other dense matrix in Q4_0, the grid's own codes kept."""
    import gguf

    from compressors import io

    out = applied("llama")
    summary = export(capsys, out, "gguf", tmp_path / "gg", "--gguf-type", "Q4_0",
                     "--gguf-embedding-type", "Q8_0")  # fmt: skip
    assert (summary["gguf_type"], summary["gguf_embedding_type"]) == ("Q4_0", "Q8_0")
    reader = gguf.GGUFReader(tmp_path / "gg" / "model.gguf")
    types = {t.name: t.tensor_type.name for t in reader.tensors if len(t.shape) == 2}
    embeddings = {n for n in types if n in ("token_embd.weight", "output.weight")}
    assert "token_embd.weight" in embeddings
    assert {types[n] for n in embeddings} == {"Q8_0"}
    assert types["blk.1.attn_q.weight"] == "Q8_0"  # its own 8-bit codes
    rest = set(types) - embeddings - {"blk.1.attn_q.weight"}
    assert rest and {types[n] for n in rest} == {"Q4_0"}
    tensor = next(t for t in reader.tensors if t.name == "token_embd.weight")
    got = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    model, facts = io.load(out)
    want = io.reconstruct(model, facts).state_dict()["model.embed_tokens.weight"].numpy()
    step = np.abs(want.reshape(*want.shape[:-1], -1, 32)).max(-1, keepdims=True) / 127
    err = np.abs(got - want).reshape(step.shape[:-1] + (32,))
    # Q8_0: half a step of rounding, plus the float16 scale's rounding (127 x 2^-11 step)
    assert (err <= step * 0.57).all() and err.max() > 0


def test_gguf_blocks_hold_the_grids_own_codes(family_dir, tmp_path, capsys):
    """Scalar grids in groups of 32 are written as llama.cpp's blocks with their own
    codes: GPTQ's symmetric 4-bit as Q4_0 and 8-bit as Q8_0, which the gguf package's
    dequantizer reads back bit for bit, asymmetric 4-bit as Q4_1 (its minimum, -zero x
    scale, rounded to float16); a grid no block holds is requantized and says why."""
    import gguf

    from compressors import io
    from spectra.export.gguf_out import rotary_rows

    calib = {"corpus": "builtin", "samples": 4, "seqlen": 64, "seed": 0}
    rules = [
        {"targets": [r"re:.*self_attn\.[qkvo]_proj"], "method": "quant", "bits": 4,
         "group_size": 32, "symmetric": True, "gptq": True},
        {"targets": [r"re:.*mlp\.(gate|up)_proj"], "method": "quant", "bits": 8,
         "group_size": 32, "symmetric": True},
        {"targets": [r"re:model\.layers\.0\.mlp\.down_proj"], "method": "quant", "bits": 4,
         "group_size": 32},
        {"targets": [r"re:model\.layers\.1\.mlp\.down_proj"], "method": "quant", "bits": 4,
         "group_size": 96, "symmetric": True},
    ]  # fmt: skip
    plan = tmp_path / "plan.yaml"
    plan.write_text(yaml.safe_dump({"version": 1, "calibration": calib, "rules": rules}))
    out = tmp_path / "out"
    assert main(["apply", plan, "--model", family_dir("llama"), "-o", out]) == 0
    summary = export(capsys, out, "gguf", tmp_path / "gg")
    stored = {r["module"]: (r["stored"], r["reason"]) for r in summary["modules"]}
    assert stored["model.layers.0.self_attn.q_proj"] == ("Q4_0, its own codes", None)
    assert stored["model.layers.0.mlp.up_proj"] == ("Q8_0, its own codes", None)
    assert stored["model.layers.0.mlp.down_proj"] == ("Q4_1, its own codes", None)
    kind, why = stored["model.layers.1.mlp.down_proj"]
    assert kind == "dense Q8_0" and "groups of 96: no GGUF block type" in why
    reader = gguf.GGUFReader(tmp_path / "gg" / "model.gguf")
    by_name = {t.name: t for t in reader.tensors}
    config = json.loads((out / "config.json").read_text())
    facts = io.load(out)[1]
    gguf_name = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v",
                 "o_proj": "attn_output", "gate_proj": "ffn_gate", "up_proj": "ffn_up",
                 "down_proj": "ffn_down"}  # fmt: skip
    checked = set()
    for name, f in facts.items():
        if not stored[name][0].endswith("its own codes"):
            continue  # requantized by gguf's own Q8_0
        block, leaf = name.split(".")[2], name.rsplit(".", 1)[1]
        t = by_name[f"blk.{block}.{gguf_name[leaf]}.weight"]
        want = f.to_dense().float().numpy()
        if leaf in ("q_proj", "k_proj"):
            heads = config["num_attention_heads" if leaf == "q_proj" else "num_key_value_heads"]
            want = rotary_rows(want, heads)
        got = gguf.quants.dequantize(t.data, t.tensor_type).reshape(want.shape)
        checked.add(t.tensor_type.name)
        if t.tensor_type.name in ("Q4_0", "Q8_0"):
            assert np.array_equal(got, want), name
        elif t.tensor_type.name == "Q4_1":
            low = (-f.zeros * f.scales).float().numpy()
            assert np.abs(got - want).max() <= np.abs(low).max() * 2**-11, name
            assert np.abs(got - want).max() > 0  # the minimum was rounded, not the codes
    assert checked == {"Q4_0", "Q8_0", "Q4_1"}


def test_the_llama_cpp_preset_exports_every_quant_module_with_its_codes(
    family_dir, tmp_path, capsys, cli
):
    """`plan auto --method quant --preset llama.cpp` offers only the grids GGUF keeps
    (symmetric 4 and 8 bits in groups of 32), so its export requantizes nothing."""
    model = family_dir("llama")
    plan = tmp_path / "plan.yaml"
    argv = ["plan", "auto", model, "--method", "quant", "--preset", "llama.cpp"]
    assert main([*argv, "--target-bits", "6", "--sensitivity", "none", "-o", plan]) == 0
    layers = yaml.safe_load(plan.read_text())["layers"]
    quant = [v for v in layers.values() if v["method"] == "quant"]
    assert quant and all(v["group_size"] == 32 and v["symmetric"] for v in quant)
    assert {v["bits"] for v in quant} == {4, 8}  # 6 bits on average: both are used
    out = tmp_path / "out"
    assert main(["apply", plan, "--model", model, "-o", out]) == 0
    summary = export(capsys, out, "gguf", tmp_path / "gg")
    stored = {r["stored"] for r in summary["modules"]}
    assert stored <= {"Q4_0, its own codes", "Q8_0, its own codes"}, stored
    bad = cli("plan", "auto", model, "--preset", "vllm", "-o", tmp_path / "p.yaml")
    assert bad.returncode == 2 and "--preset 'vllm': use one of llama.cpp" in bad.stderr
    bad = cli("plan", "auto", model, "--preset", "llama.cpp", "-o", tmp_path / "p.yaml")
    assert bad.returncode == 2 and "use it with --method quant or mixed" in bad.stderr


def _tensors_of(path):
    from safetensors.torch import load_file

    found = {}
    for f in sorted(path.glob("*.safetensors")):
        found.update(load_file(f))
    return found


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_streamed_export_equals_resident(family, family_dir, tmp_path, capsys):
    """A block-by-block OUT exported a part at a time gives the tensors (GGUF: the bytes)
    of the resident OUT exported whole."""
    plan = tmp_path / "plan.yaml"
    rules = PLAN["rules"]
    if family == "gpt2":  # Conv1D: stored (in, out), reconstructed transposed
        rules = [
            {"targets": [r"re:.*mlp\.c_fc"], "method": "quant", "bits": 4, "group_size": 32},
            {"targets": [r"re:.*attn\.c_attn"], "method": "lowrank", "rank": 8},
        ]
    plan.write_text(yaml.safe_dump({"version": 1, "rules": rules}))
    outs = {}
    for off in ("none", "disk"):
        outs[off] = tmp_path / off / "out"  # same name: GGUF metadata carries it
        outs[off].parent.mkdir()
        args = ["apply", plan, "--model", family_dir(family), "-o", outs[off], "--offload", off]
        assert main(args) == 0
    formats = ("compressed-tensors", "hf") + (("gguf",) if family == "llama" else ())
    for fmt in formats:
        got = {}
        for off, out in outs.items():
            dest = tmp_path / f"{fmt}-{off}"
            got[off] = export(capsys, out, fmt, dest, "--dtype", "float32")
            assert got[off]["offload"] == off  # auto: a block-by-block OUT streams
        a, b = tmp_path / f"{fmt}-none", tmp_path / f"{fmt}-disk"
        rows = {off: sorted(g["modules"], key=lambda r: r["module"]) for off, g in got.items()}
        assert rows["none"] == rows["disk"]
        if fmt == "gguf":
            assert (a / "model.gguf").read_bytes() == (b / "model.gguf").read_bytes()
            continue
        assert len(list(b.glob("model-*-of-*.safetensors"))) > 2  # a file per part
        assert json.loads((a / "config.json").read_text()) == json.loads(
            (b / "config.json").read_text()
        )
        ta, tb = _tensors_of(a), _tensors_of(b)
        assert ta.keys() == tb.keys()
        for k in ta:
            assert ta[k].dtype == tb[k].dtype and torch.equal(ta[k], tb[k]), k
    assert rel(read_back(tmp_path, tmp_path / "hf-disk"), ours(outs["none"])) < 1e-5


def test_export_offload_none_refuses_what_memory_cannot_hold(applied, tmp_path, cli, monkeypatch):
    out = applied("llama")
    monkeypatch.setenv("SPECTRA_MEMORY_GB", "0.00001")
    r = cli("export", out, "--format", "hf", "-o", tmp_path / "hf", "--offload", "none")
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert "needs about" in r.stderr and "--offload disk" in r.stderr
    assert not (tmp_path / "hf").exists()


def test_serve_check_runs_the_export_in_its_engine(applied, tmp_path, capsys, cli):
    """transformers, in a process of its own that imports no spectra, scores the hf
    export on `spectra eval`'s windows: the same perplexity, with its memory and speed."""
    out = applied("llama")
    export(capsys, out, "hf", tmp_path / "hf")
    export(capsys, out, "hf", tmp_path / "base")  # the same export twice: equal rows
    r = cli("serve-check", tmp_path / "hf", "--baseline", tmp_path / "base", "--seqlen",
            "64", "--max-tokens", "256", "--decode", "4", "--json")  # fmt: skip
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert [row["engine"] for row in rows] == ["transformers", "transformers"]
    assert rows[0]["ppl"] == pytest.approx(rows[1]["ppl"], rel=1e-9)
    assert rows[0]["decoded"] == 4 and rows[0]["decode_tok_s"] > 0
    assert rows[0]["peak_rss_gb"] > 0.1 and rows[0]["file_bytes"] > 0
    # the engine's own runtime before the model, and the model's resident tensors (the
    # stored weights, plus a few rotary buffers)
    assert 0.05 < rows[0]["runtime_rss_gb"] < rows[0]["peak_rss_gb"]
    stored = rows[0]["file_bytes"] - sum(
        8 + int.from_bytes(f.read_bytes()[:8], "little")
        for f in (tmp_path / "hf").glob("*.safetensors")
    )  # each file's 8-byte length and JSON header are not weights
    assert stored <= rows[0]["weights_bytes"] <= stored * 1.01
    capsys.readouterr()
    args = ["eval", tmp_path / "hf", "--seqlen", "64", "--max-tokens", "256", "--json"]
    assert main(args) == 0
    assert rows[0]["ppl"] == pytest.approx(json.loads(capsys.readouterr().out)["ppl"], rel=1e-4)
    missing = cli("serve-check", tmp_path / "hf", "--engine", "llama.cpp",
                  env={"SPECTRA_ENGINES": str(tmp_path / "none")})  # fmt: skip
    assert missing.returncode == 2
    assert "llama.cpp: no engine environment at" in missing.stderr
    assert "run `make engines`" in missing.stderr
    none = cli("serve-check", tmp_path / "hf", "--repeats", "0")
    assert none.returncode == 2 and "--repeats 0: both must be >= 1" in none.stderr


LLAMACPP = Path(__file__).resolve().parents[2] / ".venv-llamacpp" / ".spectra-engine"


@pytest.mark.engines
@pytest.mark.skipif(not LLAMACPP.is_file(), reason="no .venv-llamacpp (make engines)")
def test_llama_cpp_scores_gptqs_own_q4_0_blocks_as_spectra_does(family_dir, tmp_path, capsys):
    """llama.cpp itself (llama-cpp-python, its own process) loads a GPTQ W4 g32 export
    whose blocks are the grid's own codes and scores it within 0.5% of `spectra eval
    OUT` on the same windows."""
    calib = {"corpus": "builtin", "samples": 4, "seqlen": 64, "seed": 0}
    rule = {"targets": [r"re:model\.layers\.\d+\..*_proj"], "method": "quant", "bits": 4,
            "group_size": 32, "symmetric": True, "gptq": True}  # fmt: skip
    plan = tmp_path / "plan.yaml"
    plan.write_text(yaml.safe_dump({"version": 1, "calibration": calib, "rules": [rule]}))
    out = tmp_path / "out"
    assert main(["apply", plan, "--model", family_dir("llama"), "-o", out]) == 0
    summary = export(capsys, out, "gguf", tmp_path / "gg", "--gguf-type", "F16")
    assert {r["stored"] for r in summary["modules"]} == {"Q4_0, its own codes"}
    capsys.readouterr()
    argv = ["serve-check", tmp_path / "gg", "--seqlen", "64", "--max-tokens", "512"]
    assert main([*argv, "--decode", "4", "--json"]) == 0
    row = json.loads(capsys.readouterr().out)[0]
    assert row["engine"] == "llama.cpp" and row["loaded"] and row["decoded"] == 4
    args = ["eval", out, "--seqlen", "64", "--max-tokens", "512", "--no-baseline", "--json"]
    assert main(args) == 0
    ours = json.loads(capsys.readouterr().out)["ppl"]
    assert abs(row["ppl"] / ours - 1) < 5e-3, (row["ppl"], ours)


def factorized_numbers(out, name) -> int:
    from compressors import io

    return io.load(out)[1][name].n_params


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_hf_export_keeps_losparse_and_mpo_compact(family, family_dir, tmp_path, capsys):
    """LoSparse (its factors and CSR residual, or its kept rows) and MPO (its cores) are
    stored compact and run by the export's modeling file in plain transformers: the
    OUT's logits, each module holding its form's numbers, not m n (qwen2: with biases)."""
    from safetensors import safe_open

    from compressors import io
    from spectra.io.model import open_model

    out = apply_rules(
        family_dir(family),
        tmp_path,
        {"targets": [r"re:.*layers\.0\.self_attn\.q_proj"], "method": "losparse", "rank": 4,
         "sparsity": 0.95},
        {"targets": [r"re:.*layers\.0\.mlp\.up_proj"], "method": "losparse", "rank": 4,
         "sparsity": 0.9, "structured": "rows"},
        {"targets": [r"re:.*layers\.1\.mlp\.down_proj"], "method": "mpo", "cores": 2,
         "bond_dim": 4},
    )  # fmt: skip
    summary = export(capsys, out, "hf", tmp_path / "hf")
    stored = {r["module"]: r["stored"] for r in summary["modules"]}
    q, up, down = (
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.mlp.up_proj",
        "model.layers.1.mlp.down_proj",
    )
    assert stored[q].startswith("low rank 4 + sparse ") and stored[q].endswith(" nonzeros")
    assert stored[up].startswith("low rank 4 + sparse ") and stored[up].endswith(" rows")
    assert stored[down].startswith("MPO, 2 cores, bond ")
    held = {r["module"]: r["bytes"] for r in summary["modules"]}
    assert summary["bytes_by_kind"] == {"losparse": held[q] + held[up], "mpo": held[down]}
    assert held[down] == 4 * factorized_numbers(out, down)  # float32 cores
    names = set()
    for f in (tmp_path / "hf").glob("*.safetensors"):
        with safe_open(f, "pt") as st:
            names |= set(st.keys())
    assert {f"{q}.s_crow", f"{q}.s_col", f"{q}.s_values", f"{up}.row_values"} <= names
    assert {f"{down}.core0", f"{down}.core1"} <= names
    assert not {f"{q}.weight", f"{up}.weight", f"{down}.weight"} & names
    assert (family == "qwen2") == (f"{q}.bias" in names)
    assert rel(read_back(tmp_path, tmp_path / "hf"), ours(out)) < 1e-5
    # resident: each module holds its form's numbers
    factorized, dense = io.load(out)[1], io.reconstruct(*io.load(out))
    compact = open_model(str(tmp_path / "hf"), "cpu", "float32", "none").load()
    held = dict(compact.named_modules())
    for name in (q, up, down):
        ours_n = factorized[name].n_params
        theirs = sum(p.numel() for p in held[name].parameters() if p is not held[name].bias)
        assert theirs == ours_n < dict(dense.named_modules())[name].weight.numel()
