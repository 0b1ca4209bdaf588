"""spectra calibrate and the calibration cache: hits, misses, corruption, bad input."""

import json
import shutil

import pytest
import torch

from compressors import activations
from spectra.cli import main
from spectra.data import calibration
from spectra.io import model as model_module
from spectra.io.model import open_model

SMALL = calibration.CalibrationSpec(samples=4, seqlen=32)


def _same(a: calibration.Grams, b: calibration.Grams) -> bool:
    return a.blocks == b.blocks and all(
        a[i].keys() == b[i].keys()
        and all(torch.equal(a[i][n][0], b[i][n][0]) and a[i][n][1] == b[i][n][1] for n in a[i])
        for i in a.blocks
    )


def test_a_hit_is_the_fresh_computation_and_equals_the_dense_inputs(family_dir):
    path = str(family_dir("llama"))
    info = {}
    fresh = calibration.calibrate(open_model(path), SMALL, info=info)
    assert info["cached"] is False and info["tokens"] == 4 * 32
    again = calibration.calibrate(open_model(path), SMALL, info=info)
    assert info["cached"] is True and again.folder == fresh.folder
    assert _same(fresh, again)
    # the stored Grams are those of the dense model's own inputs (float32 of float64 sums)
    model, tok = open_model(path, "cpu", "float32", "none").load(), open_model(path).tokenizer()
    want = activations.collect(model, calibration.calibration_windows(tok, SMALL))
    for block, grams in want.items():
        got = again[block]
        for name, (h, rows) in grams.items():
            assert got[name][0].dtype == torch.float32 and got[name][1] == rows
            torch.testing.assert_close(got[name][0].double(), h, rtol=1e-6, atol=1e-6)
    block = again[0]
    q, k = (block[f"model.layers.0.self_attn.{p}_proj"][0] for p in "qk")
    assert q is k  # shared on disk, shared when read


def test_a_changed_weight_or_corpus_recomputes(family_dir, tmp_path):
    src = family_dir("llama")
    work = tmp_path / "model"
    shutil.copytree(src, work)
    info = {}
    first = calibration.calibrate(open_model(str(work)), SMALL, info=info)
    from safetensors.torch import load_file, save_file

    weights = load_file(work / "model.safetensors")
    weights["model.layers.0.input_layernorm.weight"] *= 2  # not even a matrix
    save_file(weights, str(work / "model.safetensors"), metadata={"format": "pt"})
    second = calibration.calibrate(open_model(str(work)), SMALL, info=info)
    assert info["cached"] is False and second.folder != first.folder
    name = "model.layers.0.self_attn.q_proj"
    assert not torch.equal(first[0][name][0], second[0][name][0])

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog\n" * 200)
    spec = calibration.CalibrationSpec(corpus=str(corpus), samples=2, seqlen=32)
    a = calibration.calibrate(open_model(str(work)), spec, info=info)
    assert info["cached"] is False
    corpus.write_text("pack my box with five dozen liquor jugs\n" * 200)
    b = calibration.calibrate(open_model(str(work)), spec, info=info)
    assert info["cached"] is False and a.folder != b.folder


@pytest.mark.parametrize("damage", ["truncate", "garbage", "meta"])
def test_a_damaged_entry_is_recomputed_without_error(family_dir, damage):
    path = str(family_dir("llama"))
    good = calibration.calibrate(open_model(path), SMALL)
    block = good.folder / good.meta["blocks"]["1"]["file"]
    saved = {p.name: p.read_bytes() for p in good.folder.glob("*.safetensors")}
    if damage == "truncate":
        block.write_bytes(block.read_bytes()[:-100])
    elif damage == "garbage":
        block.write_bytes(b"\xff" * block.stat().st_size)
    else:
        (good.folder / "meta.json").write_text("{not json")
    info = {}
    again = calibration.calibrate(open_model(path), SMALL, info=info)
    assert info["cached"] is False
    assert {p.name: p.read_bytes() for p in again.folder.glob("*.safetensors")} == saved
    assert (
        _same(again, calibration.calibrate(open_model(path), SMALL, info=info))
        and info["cached"] is True
    )


def test_apply_reads_the_cache_that_calibrate_wrote(family_dir, tmp_path, capsys):
    path = str(family_dir("llama"))
    assert main(["calibrate", path, "--tokens", "128", "--seqlen", "32", "--json"]) == 0
    made = json.loads(capsys.readouterr().out)
    assert made["cached"] is False and made["tokens"] == 128 and made["blocks"] == 2
    assert made["modules"] == 14 and made["grams"] == 8
    plan = tmp_path / "gptq.yaml"
    plan.write_text(
        "calibration: {samples: 4, seqlen: 32}\n"
        "rules:\n  - targets: ['re:.*mlp\\.down_proj']\n"
        "    method: quant\n    bits: 3\n    group_size: 16\n    gptq: true\n"
    )
    folders = sorted((tmp_path / "spectra-cache" / "calibration").iterdir())
    assert main(["apply", str(plan), "--model", path, "-o", str(tmp_path / "out")]) == 0
    assert sorted((tmp_path / "spectra-cache" / "calibration").iterdir()) == folders  # a hit
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["calibration_tokens"] == 128
    # the codes are GPTQ's on exactly the cached H
    from compressors.io import load
    from compressors.quant import QuantConfig, compress

    grams = calibration.calibrate(open_model(path), SMALL)
    model = open_model(path, "cpu", "float32", "none").load()
    w = model.model.layers[1].mlp.down_proj.weight.detach()
    h, rows = grams[1]["model.layers.1.mlp.down_proj"]
    want = compress(w, QuantConfig(bits=3, group_size=16, gptq=True), cal_of(h, rows))
    got = load(tmp_path / "out")[0].model.layers[1].mlp.down_proj
    assert torch.equal(got.codes, want.codes)


def cal_of(h, rows):
    from compressors.base import Calibration

    return Calibration(h.double(), rows)


def _nothing_written(cache) -> bool:
    return not (cache / "calibration").exists() or not any((cache / "calibration").iterdir())


@pytest.mark.parametrize(
    ("case", "needle"),
    [
        ("missing-model", "no such model"),
        ("empty-corpus", "not one window"),
        ("zero-tokens", "--tokens 0"),
        ("short-corpus", "not one window"),
        ("bad-seqlen", "--seqlen 1"),
    ],
)
def test_bad_input_exits_2_with_one_line_and_writes_nothing(
    case, needle, family_dir, tmp_path, capsys, isolated_cache
):
    path = str(family_dir("llama"))
    corpus = tmp_path / "corpus.txt"
    argv = ["calibrate", path, "--seqlen", "32", "--tokens", "64"]
    if case == "missing-model":
        argv[1] = str(tmp_path / "nope")
    elif case == "empty-corpus":
        corpus.write_text("")
        argv += ["--corpus", str(corpus)]
    elif case == "zero-tokens":
        argv[5] = "0"
    elif case == "short-corpus":
        corpus.write_text("a few words")
        argv += ["--corpus", str(corpus)]
    else:
        argv[3] = "1"
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("spectra: error:") and needle in err[0], err
    assert _nothing_written(isolated_cache)


def test_a_repeat_is_a_file_read_without_the_tokenizer(family_dir, monkeypatch):
    path = str(family_dir("llama"))
    first = calibration.calibrate(open_model(path), SMALL)

    def no_tokenizer(spec):
        raise AssertionError("a cached calibration must not need the tokenizer")

    monkeypatch.setattr(model_module, "tokenizer", no_tokenizer)
    info = {}
    again = calibration.calibrate(open_model(path), SMALL, info=info)
    assert info["cached"] and again.folder == first.folder and _same(first, again)
    # another setting is no alias of it
    with pytest.raises(AssertionError, match="must not need"):
        calibration.calibrate(open_model(path), calibration.CalibrationSpec(samples=3, seqlen=32))
