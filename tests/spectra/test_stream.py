"""Block streaming: a model whose weights stay on disk gives the resident model's numbers.

Oracles: the dense forward pass of the model loaded whole (perplexity), the resident
path (Grams, compressed weights, perplexity of the compressed model).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import FAMILIES

from compressors import activations, blocks
from spectra.cli import main as cli_main
from spectra.data import perplexity as ev
from spectra.errors import SpectraInputError
from spectra.io.model import open_model


def _dense_ppl(path: Path, x: torch.Tensor) -> float:
    """exp(mean NLL) from the plain model's own forward, batch by batch."""
    model = open_model(str(path), "cpu", "float32", "none").load()
    with torch.no_grad():
        nll = torch.cat([ev.window_nll(model, x[lo : lo + 4]) for lo in range(0, len(x), 4)])
    return math.exp(float(nll.mean()))


@pytest.mark.parametrize("family", FAMILIES)
def test_perplexity_streamed_equals_resident_and_dense_forward(family, family_dir):
    path = family_dir(family)
    tok = open_model(str(path)).tokenizer()
    ids = ev.token_stream(tok, "builtin", "eval")
    got = {}
    for offload in ("none", "disk"):
        model = open_model(str(path), "cpu", "float32", offload).load()
        assert blocks.is_streamed(model) == (offload == "disk")
        got[offload] = ev.perplexity(model, tok, ids=ids, seqlen=64, max_tokens=1024).ppl
    ref = _dense_ppl(path, ids.windows(64, 1024))
    assert got["disk"] == pytest.approx(ref, rel=1e-6)
    assert got["none"] == pytest.approx(ref, rel=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_grams_streamed_equal_resident(family, family_dir):
    path = family_dir(family)
    ids = torch.randint(0, 320, (6, 32), generator=torch.Generator().manual_seed(0))
    grams = {
        off: activations.collect(open_model(str(path), "cpu", "float32", off).load(), ids)
        for off in ("none", "disk")
    }
    assert grams["none"].keys() == grams["disk"].keys() == {0, 1}
    for block, mods in grams["none"].items():
        assert mods.keys() == grams["disk"][block].keys()
        for name, (h, rows) in mods.items():
            assert grams["disk"][block][name][1] == rows
            torch.testing.assert_close(grams["disk"][block][name][0], h, rtol=0, atol=0)


def test_streamed_model_holds_only_what_is_onloaded(tiny_llama_dir):
    model = open_model(str(tiny_llama_dir), "cpu", "float32", "disk").load()
    layers = blocks.decoder_layers(model)
    assert all(p.is_meta for p in model.parameters())
    with blocks.onloaded(model, layers[1]):
        real = [n for n, p in model.named_parameters() if not p.is_meta]
        assert real and all(n.startswith("model.layers.1.") for n in real)
    assert all(p.is_meta for p in model.parameters())


def test_a_module_swapped_in_while_onloaded_still_frees_the_one_it_replaced(tiny_llama_dir):
    """apply puts compact modules in place of a block's dense ones while the block is
    onloaded: leaving the block must free the dense weights all the same (a block's
    worth of memory per block, before)."""
    from torch import nn

    from compressors.apply import set_module

    model = open_model(str(tiny_llama_dir), "cpu", "float32", "disk").load()
    layer = blocks.decoder_layers(model)[0]
    dense = layer.mlp.up_proj
    with blocks.onloaded(model, layer):
        assert not dense.weight.is_meta
        set_module(model, "model.layers.0.mlp.up_proj", nn.Identity())
    assert dense.weight.is_meta
    assert all(p.is_meta for p in model.parameters())


PLAN = """version: 1
calibration: {corpus: builtin, samples: 8, seqlen: 64, seed: 0%s}
rules:
  - targets: ["re:.*(mlp|attn)\\\\.(c_fc|c_proj|gate_proj|up_proj|down_proj)"]
    method: quant
    bits: 4
    group_size: 16
    gptq: true
  - targets: ["re:.*(attn\\\\.c_attn|self_attn\\\\.[qkvo]_proj)"]
    method: lowrank
    rank: 8
    whiten: true
"""


def _tensors(out: Path) -> dict:
    from safetensors.torch import load_file

    manifest = json.loads((out / "manifest.json").read_text())
    shards = manifest.get("shards") or {"factors": ["factors.safetensors"], "dense": []}
    found = {}
    for part in shards["factors"] + shards["dense"]:
        found.update(load_file(out / part))
    return found


@pytest.mark.slow
@pytest.mark.parametrize(
    ("family", "sequential"), [("llama", False), ("llama", True), ("gpt2", False)]
)
def test_apply_streamed_equals_resident(family, sequential, family_dir, cli, tmp_path):
    path = family_dir(family)
    plan = tmp_path / "plan.yaml"
    plan.write_text(PLAN % (", sequential: true" if sequential else ""))
    outs = {}
    for off in ("none", "disk"):
        outs[off] = tmp_path / f"out-{off}"
        r = cli("apply", plan, "--model", path, "-o", outs[off], "--offload", off)
        assert r.returncode == 0, r.stderr
    shards = json.loads((outs["disk"] / "manifest.json").read_text())["shards"]
    assert shards["factors"] == ["factors-00000.safetensors", "factors-00001.safetensors"]
    a, b = _tensors(outs["none"]), _tensors(outs["disk"])
    assert a.keys() == b.keys()
    for k in a:  # GPTQ codes may flip on a float32 rounding of H: none did here
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-5)
    ppl = {}
    for off, out in outs.items():
        r = cli("eval", out, "--seqlen", 64, "--max-tokens", 1024, "--no-baseline", "--json")
        assert r.returncode == 0, r.stderr
        ppl[off] = json.loads(r.stdout)["ppl"]
    assert ppl["disk"] == pytest.approx(ppl["none"], rel=1e-5)


RTN_HEAD = """version: 1
rules:
  - targets: ["re:.*(mlp\\\\.down_proj|mlp\\\\.c_proj|fc2|lm_head)"]
    method: quant
    bits: 4
    group_size: 16
"""


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
def test_streamed_apply_writes_the_outer_modules_one_at_a_time(family, family_dir, tmp_path):
    """An 8B's embeddings and head are 2 GB each in float32: a streamed apply holds one
    of them at a time, yet writes what the resident apply writes (a compressed head
    included, a tied one once)."""
    from compressors import io

    path = family_dir(family)
    plan = tmp_path / "plan.yaml"
    plan.write_text(RTN_HEAD)
    held = []
    part = io.Writer.part

    def spy(self, model, facts, block=None, prefix=""):
        if block is None and prefix:
            seen, count = set(), 0  # modules with a live tensor (a tied one counted once)
            for m in blocks.outer_modules(model):
                live = {id(p) for p in m.parameters(recurse=False) if not p.is_meta}
                count += bool(live - seen)
                seen |= live
            held.append(count)
        return part(self, model, facts, block, prefix)

    outs = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(io.Writer, "part", spy)
        for off in ("none", "disk"):
            outs[off] = tmp_path / f"out-{off}"
            argv = ["apply", plan, "--model", path, "-o", outs[off], "--offload", off]
            assert cli_main([str(a) for a in argv]) == 0
    model = open_model(str(path), "cpu", "float32", "none").load()
    assert held and max(held) == 1, held  # one outer module materialised per part
    assert len(held) == len(blocks.outer_modules(model))
    a, b = _tensors(outs["none"]), _tensors(outs["disk"])
    assert a.keys() == b.keys()
    assert any(k.startswith("lm_head#") for k in a) == (family == "llama")  # the others tie it
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0)
    # no tensor is written twice (in two parts, or as dense and as a factor)
    from safetensors import safe_open

    shards = io.shard_files(outs["disk"])
    counts = []
    for part in shards["factors"] + shards["dense"]:
        with safe_open(outs["disk"] / part, "pt") as f:
            counts.append(len(list(f.keys())))
    assert sum(counts) == len(b)
    # written block by block: read back block by block
    from compressors.opened import choose_offload

    assert choose_offload(outs["disk"], "auto") == "disk"
    assert choose_offload(outs["none"], "auto") == "none"
    # a listed part that is missing is named
    gone = shards["dense"][-1]
    (outs["disk"] / gone).unlink()
    assert io.is_compressed_checkpoint(outs["disk"])
    with pytest.raises(SpectraInputError, match=f"{gone} is missing"):
        io.index(outs["disk"])
    with pytest.raises(SpectraInputError, match=f"{gone} is missing"):
        io.load(outs["disk"])


def test_interrupted_streamed_apply_leaves_no_out(tiny_llama_dir, tmp_path, monkeypatch):
    from compressors import io
    from spectra import cli

    plan = tmp_path / "plan.yaml"
    plan.write_text(
        "version: 1\nrules:\n  - targets: ['re:.*mlp.*']\n    method: lowrank\n    rank: 4\n"
    )
    real = io.Writer.part

    def part(self, model, facts, block=None, prefix=""):
        if block == 1:
            raise KeyboardInterrupt  # stopped between blocks, block 0 already written
        return real(self, model, facts, block, prefix)

    monkeypatch.setattr(io.Writer, "part", part)
    out = tmp_path / "out"
    argv = ["apply", str(plan), "--model", str(tiny_llama_dir), "-o", str(out), "--offload", "disk"]
    assert cli.main(argv) != 0  # "spectra: interrupted"
    assert not out.exists()
    assert not list(tmp_path.glob(".out*"))


def test_bfloat16_working_dtype(family_dir, cli):
    tiny_llama_dir = family_dir("llama")
    r32 = cli(
        "eval", tiny_llama_dir, "--seqlen", 32, "--max-tokens", 256, "--json", "--dtype", "float32"
    )
    r16 = cli(
        "eval", tiny_llama_dir, "--seqlen", 32, "--max-tokens", 256, "--json",
        "--dtype", "bfloat16", "--offload", "disk",
    )  # fmt: skip
    assert r32.returncode == 0 and r16.returncode == 0, r16.stderr
    a, b = json.loads(r32.stdout), json.loads(r16.stdout)
    assert (a["dtype"], b["dtype"], b["offload"]) == ("float32", "bfloat16", "disk")
    assert b["ppl"] == pytest.approx(a["ppl"], rel=0.02)
    assert b["ppl"] != a["ppl"]


def test_auto_dtype_is_the_checkpoints(tmp_path):
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from conftest import tiny_family

    tiny_family("qwen2").to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    h = open_model(str(tmp_path / "bf16"), "cpu", "auto", "auto")
    assert (h.dtype, h.offload) == ("bfloat16", "none")


def test_too_big_for_memory_is_refused_before_any_work(family_dir, cli, monkeypatch):
    tiny_llama_dir = family_dir("llama")
    monkeypatch.setenv("SPECTRA_MEMORY_GB", "0.0004")  # resident ~0.0005 GB, streamed ~0.00036
    with pytest.raises(SpectraInputError, match="needs about .* --offload none"):
        open_model(str(tiny_llama_dir), "cpu", "float32", "none")
    h = open_model(str(tiny_llama_dir), "cpu", "float32", "auto")
    assert h.offload == "disk"  # a block fits where the whole model does not
    r = cli("eval", tiny_llama_dir, "--offload", "none", "--dtype", "float32", "--max-tokens", 512)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "needs about" in r.stderr


def test_truncated_shard_is_refused(tmp_path, cli):
    import shutil
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from conftest import tiny_family

    path = tmp_path / "sharded"
    tiny_family("llama").save_pretrained(path, max_shard_size="100KB")
    shards = sorted(path.glob("*.safetensors"))
    assert len(shards) > 1
    data = shards[-1].read_bytes()
    shards[-1].write_bytes(data[: len(data) // 2])
    for args in (("eval", path), ("calibrate", path, "--tokens", 256)):
        r = cli(*args, "--offload", "disk")
        assert r.returncode == 2, r.stderr
        assert "truncated" in r.stderr and r.stderr.count("\n") == 1
    assert not (Path(shutil.os.environ["SPECTRA_CACHE"]) / "calibration").exists()


def test_calibration_bigger_than_the_disk_is_refused(tmp_path):
    from spectra.data import calibration

    with pytest.raises(SpectraInputError, match="GB is free"):
        calibration.check_disk(tmp_path / "calibration" / "x", 10**18)


def test_unknown_dtype_and_offload_exit_2(family_dir, cli):
    tiny_llama_dir = family_dir("llama")
    for flag, value in (("--dtype", "float8"), ("--offload", "ram")):
        r = cli("eval", tiny_llama_dir, flag, value)
        assert r.returncode == 2
        assert r.stderr.count("\n") == 1 and value in r.stderr


@pytest.mark.parametrize("sensitivity", ["fisher", "calib"])
def test_plan_auto_streamed_equals_resident(sensitivity, family_dir, tmp_path, capsys):
    from spectra.cli import main

    path = family_dir("llama")
    plans, damage = {}, {}
    for off in ("none", "disk"):
        out = tmp_path / f"{off}.json"
        argv = ["plan", "auto", str(path), "--method", "lowrank", "--target-params", "0.6"]
        tokens = "256" if sensitivity == "fisher" else "1024"
        argv += ["--sensitivity", sensitivity, "--tokens", tokens, "-o", str(out)]
        argv += ["--offload", off, "--dtype", "float32", "--json"]
        capsys.readouterr()
        assert main(argv) == 0
        damage[off] = json.loads(capsys.readouterr().out)["predicted_damage"]
        plans[off] = json.loads(out.read_text())
        if off == "none":  # the next run scores afresh rather than reading this one's cache
            import shutil

            for sub in ("sensitivity", "calibration"):
                shutil.rmtree(Path(shutil.os.environ["SPECTRA_CACHE"]) / sub, ignore_errors=True)
    assert plans["disk"] == plans["none"]
    assert damage["disk"] == pytest.approx(damage["none"], rel=1e-4)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_eval_of_a_compressed_out_streamed_equals_resident(family, family_dir, tmp_path, capsys):
    """The OUT built a block at a time from its factors scores as the OUT loaded whole."""
    import yaml

    from spectra.cli import main

    first = (  # a joint group's members are built together, from one factorization
        {"targets": [r"re:.*mlp\.(gate|up)_proj"], "method": "joint", "rank": 8}
        if family == "llama"
        else {"targets": [r"re:.*mlp\.c_fc"], "method": "lowrank", "rank": 8}
    )
    rules = [
        first,
        {"targets": [r"re:.*(down_proj|mlp\.c_proj)"], "method": "quant", "group_size": 16},
        {"targets": [r"re:.*(o_proj|c_attn)"], "method": "prune", "pattern": "2:4"},
    ]
    if family == "llama":  # an untied head compressed: built once, outside the blocks
        rules.append({"targets": ["lm_head"], "method": "lowrank", "rank": 8})
    plan = tmp_path / "plan.yaml"
    plan.write_text(yaml.safe_dump({"version": 1, "rules": rules}))
    out = tmp_path / "out"
    argv = ["apply", plan, "--model", family_dir(family), "-o", out, "--offload", "disk"]
    assert main(argv) == 0
    got = {}
    for off in ("none", "disk"):
        capsys.readouterr()
        argv = ["eval", out, "--seqlen", "64", "--max-tokens", "512", "--no-baseline", "--json"]
        assert main([*argv, "--offload", off]) == 0
        got[off] = json.loads(capsys.readouterr().out)
    assert (got["none"]["offload"], got["disk"]["offload"]) == ("none", "disk")
    assert got["disk"]["ppl"] == pytest.approx(got["none"]["ppl"], rel=1e-6)


def test_truncated_part_of_a_streamed_out_is_refused(tiny_llama_dir, tmp_path, capsys):
    from spectra.cli import main

    plan = tmp_path / "plan.yaml"
    plan.write_text(
        "version: 1\nrules:\n  - targets: ['re:.*mlp.*']\n    method: lowrank\n    rank: 4\n"
    )
    out = tmp_path / "out"
    assert main(["apply", plan, "--model", tiny_llama_dir, "-o", out, "--offload", "disk"]) == 0
    part = out / "factors-00001.safetensors"
    part.write_bytes(part.read_bytes()[:-100])
    for argv in (["eval", out], ["export", out, "--format", "hf", "-o", tmp_path / "hf"]):
        capsys.readouterr()
        assert main([*argv, "--offload", "disk"]) == 2
        err = capsys.readouterr().err
        assert "corrupt compressed checkpoint" in err and err.count("\n") == 1, err
    assert not (tmp_path / "hf").exists()


@pytest.mark.parametrize("family", FAMILIES)
def test_preview_streamed_equals_resident_and_eval(family, family_dir):
    from compressors.apply import linear_targets
    from compressors.registry import make_config
    from spectra.preview import Previewer

    path = family_dir(family)
    tok = open_model(str(path)).tokenizer()
    resident = open_model(str(path), "cpu", "float32", "none").load()
    names = [t.name for t, _ in linear_targets(resident).values() if t.block is not None]
    first = {n: make_config("lowrank", rank=4) for n in names if ".0." in n or "_0_" in n}
    later = {**first, names[-1]: make_config("quant", bits=3)}
    got = {}
    for off in ("none", "disk"):
        model = open_model(str(path), "cpu", "float32", off).load()
        pv = Previewer(model, tok, seqlen=64)
        assert pv.streamed == (off == "disk")
        a, b = pv.preview(first, 512), pv.preview(later, 512)
        assert b.first_block == 1 and b.recompressed == 1  # block 0's outputs are reused
        got[off] = (a.dense_ppl, a.ppl, b.ppl)
    fresh = Previewer(resident, tok, seqlen=64).preview(later, 512).ppl
    dense = ev.perplexity(resident, tok, seqlen=64, max_tokens=512).ppl
    assert got["disk"] == pytest.approx(got["none"], rel=1e-6)
    assert got["none"][2] == pytest.approx(fresh, rel=1e-6)
    assert got["none"][0] == pytest.approx(dense, rel=1e-6)
    assert got["none"][1] != pytest.approx(got["none"][0], rel=1e-5)  # the plan did something


def test_a_compressed_untied_head_previews_streamed_as_resident(family_dir):
    """The untied head itself compressed (Auto-allocate's plans include lm_head): the
    streamed preview still runs the real embedding through the head's replacement,
    which has no `weight` to compare with the embedding's (it failed with
    AttributeError on a random 8B-shape slice)."""
    from compressors.registry import make_config
    from spectra.preview import Previewer

    path = family_dir("llama")  # its head is untied
    tok = open_model(str(path)).tokenizer()
    layers = {"lm_head": make_config("lowrank", rank=8)}
    got = {}
    for off in ("none", "disk"):
        model = open_model(str(path), "cpu", "float32", off).load()
        assert model.lm_head.weight is not model.model.embed_tokens.weight  # untied
        r = Previewer(model, tok, seqlen=64).preview(layers, 256)
        got[off] = (r.dense_ppl, r.ppl)
    assert got["disk"] == pytest.approx(got["none"], rel=1e-6)
    assert got["none"][1] != pytest.approx(got["none"][0], rel=1e-4)  # the head changed


def test_a_converting_read_goes_band_by_band_and_equals_the_whole(tmp_path, monkeypatch):
    """read_tensor widens a stored tensor a band of rows at a time (never the whole
    stored copy beside the converted one); the result equals converting it whole."""
    from safetensors.torch import save_file

    from spectra.io import offload
    from spectra.io.tensors import read_header

    g = torch.Generator().manual_seed(0)
    stored = {
        "w": torch.randn(1000, 30, generator=g).to(torch.bfloat16),
        "v": torch.randn(17, generator=g).half(),
        "i": torch.arange(5),
    }
    save_file(stored, tmp_path / "x.safetensors")
    refs = {r.name: r for r in read_header(tmp_path / "x.safetensors")}
    monkeypatch.setattr(offload, "BAND_BYTES", 1000)  # 16 rows of w a band
    for name, t in stored.items():
        for dtype in (torch.float32, torch.bfloat16, None):
            want = t.to(dtype) if dtype is not None and t.is_floating_point() else t
            got = offload.read_tensor(refs[name], dtype)
            assert got.dtype == want.dtype and torch.equal(got, want), (name, dtype)
