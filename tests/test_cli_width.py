"""`method: width` through the plan, apply (resident and streamed), OUT and the exports:
real tiny checkpoints with a tokenizer, the exported models read back by plain
transformers in a fresh process that never imports spectra."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from spectra.cli import main

IDS = list(range(2, 60))
BLOCKS = r"re:model\.layers\.\d+"
UNIFORM = {
    "rules": [
        {"targets": [BLOCKS], "method": "width", "ffn": 40, "kv_heads": 1},
        # GPTQ reads down_proj's Gram on the kept neurons, o_proj's on the heads' new order
        {"targets": [r"re:.*(down|o)_proj"], "method": "quant", "bits": 4, "gptq": True},
    ]
}
DOWN_W4 = {"targets": [r"re:.*down_proj"], "method": "quant", "bits": 4, "group_size": 8,
           "symmetric": True}  # fmt: skip
PER_BLOCK = {
    "layers": {
        "model.layers.0": {"method": "width", "ffn": 24, "select": "norm", "skip": "attention"},
        "model.layers.1": {"method": "width", "skip": "block"},
    },
    "rules": [{"targets": [r"re:.*up_proj"], "method": "lowrank", "rank": 8}],
}

READ_BACK = """
import sys, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(
    sys.argv[1], dtype=torch.float32, trust_remote_code=sys.argv[3] == "remote"
).eval()
with torch.no_grad():
    logits = model(torch.tensor([IDS])).logits
assert "spectra" not in sys.modules and "compressors" not in sys.modules
torch.save({"logits": logits, "class": type(model).__name__}, sys.argv[2])
""".replace("IDS", str(IDS))


def write_plan(tmp_path, data, name="plan.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def read_back(tmp_path, path, remote: bool):
    script = tmp_path / "read_back.py"
    script.write_text(READ_BACK)
    out = tmp_path / "logits.pt"
    args = [sys.executable, str(script), str(path), str(out), "remote" if remote else "plain"]
    r = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return torch.load(out)


def ours(out):
    import spectra

    with torch.no_grad():
        return spectra.load_compressed(out)(torch.tensor([IDS])).logits


def linear_params(path) -> int:
    """Elements of every linear weight of an exported plain checkpoint (embeddings out)."""
    from safetensors import safe_open

    total = 0
    for f in path.glob("*.safetensors"):
        with safe_open(str(f), "pt") as s:
            for k in s.keys():  # noqa: SIM118 (safe_open has no __iter__)
                if k.endswith("_proj.weight") or k == "lm_head.weight":
                    shape = s.get_slice(k).get_shape()
                    total += shape[0] * shape[1]
    return total


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_a_uniform_width_plan_exports_the_models_own_smaller_architecture(
    family, family_dir, tmp_path, capsys
):
    """plan show counts what the export holds; resident and streamed apply agree; the hf
    export is a plain config (no remote code) whose logits are OUT's."""
    model, plan = family_dir(family), write_plan(tmp_path, UNIFORM)
    assert main(["plan", "show", plan, "--model", model, "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    rows = {r["module"]: r for r in shown["modules"]}
    assert rows["model.layers.0.mlp.gate_proj"]["shape"] == "96x64 -> 40x64"
    assert rows["model.layers.1.self_attn.k_proj"]["shape"] == "32x64 -> 16x64"
    assert rows["model.layers.1.mlp.down_proj"]["method"].startswith("width(ffn=40, kv_heads=1)")
    outs = {}
    for off in ("none", "disk"):
        outs[off] = tmp_path / f"out-{off}"
        assert main(["apply", plan, "--model", model, "-o", outs[off], "--offload", off]) == 0
        manifest = json.loads((outs[off] / "manifest.json").read_text())
        assert manifest["blocks"] == [{"ffn": 40, "kv_heads": 1}] * 2
    torch.testing.assert_close(ours(outs["disk"]), ours(outs["none"]), rtol=0, atol=1e-5)
    dest = tmp_path / "hf"
    assert main(["export", outs["disk"], "--format", "hf", "-o", dest, "--json"]) == 0
    capsys.readouterr()
    config = json.loads((dest / "config.json").read_text())
    assert (config["intermediate_size"], config["num_key_value_heads"]) == (40, 1)
    assert "auto_map" not in config and not (dest / "spectra_modeling.py").exists()
    assert linear_params(dest) == shown["totals"]["params_after"]
    got = read_back(tmp_path, dest, remote=False)
    assert got["class"] == ("LlamaForCausalLM" if family == "llama" else "Qwen2ForCausalLM")
    want = ours(outs["none"])
    assert float((got["logits"] - want).abs().max() / want.abs().max()) < 1e-5


def test_per_block_widths_export_with_the_projects_modeling_file(family_dir, tmp_path, capsys):
    """A removed attention and a skipped block: OUT equals the narrowed model, the hf
    export (its own modeling file), resident or streamed, equals OUT, and so does
    compressed-tensors (DeciLM's config, 4-bit codes on what width left)."""
    model, plan = family_dir("llama"), write_plan(tmp_path, PER_BLOCK)
    out = tmp_path / "out"
    assert main(["apply", plan, "--model", model, "-o", out]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["blocks"] == [{"ffn": 24, "kv_heads": 0}, {"ffn": 0, "kv_heads": 0}]
    import spectra

    loaded = spectra.load_compressed(out)
    x = torch.tensor([IDS])
    with torch.no_grad():  # the skipped block is the identity, the removed attention adds 0
        h = loaded.model.embed_tokens(x)
        layer = loaded.model.layers[0]
        h = h + layer.mlp(layer.post_attention_layernorm(h))
        want = loaded.lm_head(loaded.model.norm(h))
    torch.testing.assert_close(loaded(x).logits, want, rtol=0, atol=1e-5)
    dest = tmp_path / "hf"
    assert main(["export", out, "--format", "hf", "-o", dest, "--json"]) == 0
    capsys.readouterr()
    config = json.loads((dest / "config.json").read_text())
    assert config["num_hidden_layers"] == 1 and config["spectra_blocks"] == [
        {"ffn": 24, "kv_heads": 0}
    ]
    got = read_back(tmp_path, dest, remote=True)
    assert float((got["logits"] - want).abs().max() / want.abs().max()) < 1e-5
    # streamed (a tensor at a time, the skipped block's names mapped): the same checkpoint
    streamed = tmp_path / "hf-disk"
    assert main(["export", out, "--format", "hf", "-o", streamed, "--offload", "disk"]) == 0
    assert json.loads((streamed / "config.json").read_text()) == config
    got = read_back(tmp_path, streamed, remote=True)
    assert float((got["logits"] - want).abs().max() / want.abs().max()) < 1e-5
    gguf = {}
    for off in ("none", "disk"):  # llama.cpp's Deci blocks, resident or streamed: one file
        dest = tmp_path / f"gguf-{off}"
        args = ["export", out, "--format", "gguf", "--gguf-type", "F16", "--offload", off]
        assert main([*args, "-o", dest]) == 0
        gguf[off] = (dest / "model.gguf").read_bytes()
    assert gguf["none"] == gguf["disk"]
    # compressed-tensors: DeciLM's block_configs too, quant on what width left in 4 bits
    quantized = dict(PER_BLOCK, rules=[*PER_BLOCK["rules"], DOWN_W4])
    qout = tmp_path / "qout"
    assert main(["apply", write_plan(tmp_path, quantized, "q.yaml"), "--model", model,
                 "-o", qout]) == 0  # fmt: skip
    want = ours(qout)
    capsys.readouterr()
    cts = {}
    for off in ("none", "disk"):
        cts[off] = tmp_path / f"ct-{off}"
        args = ["export", qout, "--format", "compressed-tensors", "--offload", off, "--json"]
        assert main([*args, "-o", cts[off]]) == 0
        rows = json.loads(capsys.readouterr().out)["modules"]
        assert {r["stored"] for r in rows if r["module"].endswith("down_proj")} == {
            "pack-quantized int4"
        }
    config = json.loads((cts["none"] / "config.json").read_text())
    assert json.loads((cts["disk"] / "config.json").read_text()) == config
    assert config["architectures"] == ["DeciLMForCausalLM"]
    assert config["block_configs"][0]["attention"]["no_op"] is True
    assert config["quantization_config"]["format"] == "pack-quantized"
    got = read_back(tmp_path, cts["disk"], remote=True)
    assert float((got["logits"] - want).abs().max() / want.abs().max()) < 1e-4
    gemma = tmp_path / "gemma-out"  # a base DeciLM does not cover: refused, nothing written
    assert main(["apply", write_plan(tmp_path, PER_BLOCK), "--model", family_dir("gemma3"),
                 "-o", gemma]) == 0  # fmt: skip
    capsys.readouterr()
    code = main(["export", gemma, "--format", "compressed-tensors", "-o", tmp_path / "ct-g"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "DeciLM's block_configs for" in err[0], err
    assert not (tmp_path / "ct-g").exists()


@pytest.mark.parametrize(
    "layers,message",
    [
        ({"model.layers.1": {"method": "width", "ffn": 97}}, "model.layers.1: width ffn=97"),
        ({"model.layers.0": {"method": "width", "kv_heads": 3}}, "must divide the block's 2"),
        (
            {f"model.layers.{i}": {"method": "width", "skip": "block"} for i in range(2)},
            "skip=block on every block",
        ),
        ({"model.layers.0.mlp": {"method": "width", "ffn": 8}}, "no decoder block"),
        ({"model.layers.0": {"method": "width", "ffn": 0}}, "ffn"),
    ],
)
def test_impossible_widths_exit_2_naming_the_block(layers, message, family_dir, tmp_path, cli):
    plan = write_plan(tmp_path, {"layers": layers})
    out = tmp_path / "out"
    for args in (["plan", "show", plan], ["apply", plan, "-o", out]):
        r = cli(*args, "--model", family_dir("llama"))
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and message in lines[0], r.stderr
    assert not out.exists()


def test_width_refuses_an_mlp_that_is_not_gated(family_dir, tmp_path, cli):
    plan = write_plan(
        tmp_path, {"rules": [{"targets": [r"re:.*\.h\.\d+"], "method": "width", "ffn": 8}]}
    )
    r = cli("apply", plan, "--model", family_dir("gpt2"), "-o", tmp_path / "out")
    assert r.returncode == 2 and "gated MLP" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_plan_auto_width_meets_the_budget_and_loss_beats_uniform(family_dir, tmp_path, capsys):
    """Each allocation keeps at most the target and plan show counts what it says; the
    calibrated allocation's damage (each block's greedy residual with down_proj's output
    channels weighted by the loss's output Fisher, scaled to the KL that narrowing that
    block alone to the uniform width measures, as apply narrows it) is at most
    uniform's; erank
    orders widths as the blocks' effective ranks; `--uniform` rounds loss's widths to
    uniform's, `--multiple` sets the step."""
    from compressors.width import greedy_neurons
    from spectra.data import calibration
    from spectra.io.model import open_model
    from spectra.plan.sensitivity import importance_of

    model_dir = family_dir("llama")
    plans = {}
    for how in ("uniform", "erank", "loss"):
        out = tmp_path / f"{how}.yaml"
        args = ["plan", "auto", model_dir, "--method", "width", "--allocate", how]
        assert main([*args, "--target-params", "0.85", "-o", out, "--json"]) == 0
        said = json.loads(capsys.readouterr().out)
        assert said["params_ratio"] <= 0.85
        assert main(["plan", "show", out, "--model", model_dir, "--json"]) == 0
        shown = json.loads(capsys.readouterr().out)["totals"]
        assert shown["params_ratio"] == pytest.approx(said["params_ratio"], abs=1e-12)
        plans[how] = yaml.safe_load(out.read_text())
    widths = {how: p["allocation"]["widths"] for how, p in plans.items()}
    assert len(set(widths["uniform"].values())) == 1
    erank = plans["erank"]["allocation"]["erank"]
    names = sorted(erank, key=erank.get)
    assert [widths["erank"][n] for n in names] == sorted(widths["erank"][n] for n in names)
    model = open_model(model_dir)
    grams = calibration.cached(model, calibration.for_model(model, tokens=4096))
    importance = importance_of(model, grams)
    got = plans["loss"]["allocation"]
    assert got["damage_kind"] == "loss (output Fisher, anchored on measured KL)"
    anchor = got["anchor"]
    assert anchor["width"] == widths["uniform"] and anchor["windows"] == 4

    def residual(name, k):  # the weighted greedy residual k neurons of a block leave
        block = int(name.rsplit(".", 1)[1])
        h = grams[block][f"{name}.mlp.down_proj"][0].double()
        w = torch.from_numpy(model.matrix(f"{name}.mlp.down_proj").read()).double()
        w = w * importance[f"{name}.mlp.down_proj"][0].double().sqrt()[:, None]
        gains: list = []
        greedy_neurons(w, h, k, gains)
        return float(torch.einsum("ij,jk,ik->", w, h, w)) - sum(gains)

    for name, k in widths["uniform"].items():  # the prediction at the anchor
        assert anchor["predicted"][name] == pytest.approx(residual(name, k), rel=1e-6)
    scale = {n: anchor["kl"][n] / anchor["predicted"][n] for n in anchor["kl"]}

    def damage(chosen):  # each block's residual, scaled to its measured KL
        return sum(scale[n] * residual(n, k) for n, k in chosen.items())

    assert damage(widths["loss"]) <= damage(widths["uniform"]) * (1 + 1e-9)
    assert sum(got["damage"].values()) == pytest.approx(damage(widths["loss"]), rel=1e-6)
    # the anchor's KL is what `apply` of that one block's width does to the output
    name, k = next(iter(widths["uniform"].items()))
    layers = {name: {"method": "width", "ffn": k}}
    one = {"calibration": plans["loss"]["calibration"], "layers": layers}
    one = write_plan(tmp_path, one, "one.yaml")
    assert main(["apply", one, "--model", model_dir, "-o", tmp_path / "one"]) == 0
    from transformers import AutoModelForCausalLM

    import spectra

    narrowed = spectra.load_compressed(tmp_path / "one").eval()
    dense = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    spec = calibration.CalibrationSpec(**plans["loss"]["calibration"])
    windows = calibration.calibration_windows(model.tokenizer(), spec)[-4:]
    with torch.no_grad():
        kl = 0.0
        for x in windows:
            p = torch.log_softmax(dense(x[None]).logits[0].double(), -1)
            q = torch.log_softmax(narrowed(x[None]).logits[0].double(), -1)
            kl += float((p.exp() * (p - q)).sum(-1).mean()) / len(windows)
    assert anchor["kl"][name] == pytest.approx(kl, rel=1e-3)
    out = tmp_path / "round.yaml"
    args = ["plan", "auto", model_dir, "--method", "width", "--target-params", "0.85"]
    assert main([*args, "--uniform", "--multiple", "16", "-o", out, "--json"]) == 0
    capsys.readouterr()
    got = yaml.safe_load(out.read_text())["allocation"]
    assert len(set(got["widths"].values())) == 1 and got["uniform"] and got["multiple"] == 16
    assert all(w % 16 == 0 or w == 96 for w in got["proposed"].values())
    assert next(iter(got["widths"].values())) >= next(iter(widths["uniform"].values()))
    out = tmp_path / "plain.yaml"  # --no-anchor: the second-order curves alone
    assert main([*args, "--no-anchor", "-o", out, "--json"]) == 0
    plain = yaml.safe_load(out.read_text())["allocation"]
    assert plain["damage_kind"] == "loss (output Fisher)" and "anchor" not in plain
    assert sum(plain["damage"].values()) == pytest.approx(
        sum(residual(n, k) for n, k in plain["widths"].items()), rel=1e-6
    )


def test_plan_auto_width_refuses_what_it_cannot_do(family_dir, tmp_path, cli):
    for args, message in (
        (["--allocate", "alpha"], "with --method width one of"),
        (["--target-params", "0.05"], "at least 32 neurons"),
        (["--target-bits", "4"], "--target-bits with --method width"),
        (["--multiple", "0"], "--multiple 0"),
    ):
        out = tmp_path / "p.yaml"
        r = cli("plan", "auto", family_dir("llama"), "--method", "width", *args, "-o", out)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and message in lines[0], r.stderr
        assert not out.exists()
    r = cli("plan", "auto", family_dir("gpt2"), "--method", "width", "-o", tmp_path / "g.yaml")
    assert r.returncode == 2 and "gated MLP" in r.stderr
    r = cli("plan", "auto", family_dir("llama"), "--method", "lowrank", "--uniform", "-o", out)
    assert r.returncode == 2 and "--uniform is for --method width" in r.stderr and not out.exists()
    r = cli("plan", "auto", family_dir("llama"), "--method", "prune", "--no-anchor", "-o", out)
    assert r.returncode == 2 and "--no-anchor is for --method width" in r.stderr


LLAMACPP = Path(__file__).resolve().parents[1] / ".venv-llamacpp" / ".spectra-engine"


@pytest.mark.engines
@pytest.mark.skipif(not LLAMACPP.is_file(), reason="no .venv-llamacpp (make engines)")
@pytest.mark.parametrize("plan", ["uniform", "per-block"])
def test_llama_cpp_runs_the_narrowed_model_as_spectra_does(plan, family_dir, tmp_path, capsys):
    """llama.cpp itself loads the width GGUF (uniform: Llama with the smaller sizes;
    per block: its Deci blocks, per-layer sizes, 0 for a removed sublayer) and scores it
    within 0.5% of `spectra eval OUT` on the same windows."""
    calib = {"corpus": "builtin", "samples": 4, "seqlen": 64, "seed": 0}
    data = dict(UNIFORM if plan == "uniform" else PER_BLOCK, calibration=calib)
    if plan == "uniform":  # 32-weight rows for Q8_0: ffn 64, one key/value head
        data["rules"] = [dict(data["rules"][0], ffn=64)]
    else:  # an attention left somewhere: llama.cpp needs one layer with a cache
        data["layers"] = {
            "model.layers.0": {"method": "width", "ffn": 32, "kv_heads": 1},
            "model.layers.1": {"method": "width", "ffn": 64, "skip": "attention"},
        }
    out = tmp_path / "out"
    assert (
        main(["apply", write_plan(tmp_path, data), "--model", family_dir("llama"), "-o", out]) == 0
    )
    export_args = ["export", out, "--format", "gguf", "-o", tmp_path / "gg", "--gguf-type", "F16"]
    assert main([*export_args, "--json"]) == 0
    capsys.readouterr()
    argv = ["serve-check", tmp_path / "gg", "--seqlen", "64", "--max-tokens", "512"]
    assert main([*argv, "--decode", "4", "--json"]) == 0
    row = json.loads(capsys.readouterr().out)[0]
    assert row["engine"] == "llama.cpp" and row["loaded"] and row["decoded"] == 4
    args = ["eval", out, "--seqlen", "64", "--max-tokens", "512", "--no-baseline", "--json"]
    assert main(args) == 0
    ours = json.loads(capsys.readouterr().out)["ppl"]
    assert abs(row["ppl"] / ours - 1) < 5e-3, (row["ppl"], ours)
