"""spectra apply / eval on OUT: outputs, refusals, and an interrupted apply."""

import json

import pytest
import torch
import yaml

from spectra.cli import main
from spectra.io.model import open_model

PLAN = {
    "version": 1,
    "rules": [
        {
            "targets": [r"re:model\.layers\.\d+\.mlp\.(gate|up)_proj"],
            "method": "lowrank",
            "rank": 12,
        },
        {"targets": [r"re:model\.layers\.\d+\.self_attn\.[qk]_proj"], "method": "joint", "rank": 8},
    ],
    "layers": {"model.layers.1.mlp.down_proj": {"method": "quant", "bits": 4, "group_size": 32}},
}


@pytest.fixture()
def plan_file(tmp_path):
    p = tmp_path / "plan.yaml"
    p.write_text(yaml.safe_dump(PLAN))
    return p


def test_apply_writes_out_that_reloads_with_its_report(tiny_llama_dir, plan_file, tmp_path, cli):
    import spectra

    out = tmp_path / "out"
    r = cli("apply", plan_file, "--model", tiny_llama_dir, "-o", out, "--json", "--dense")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    report = json.loads((out / "report.json").read_text())
    assert summary["compressed"] == len(report["modules"]) == 9
    totals = report["totals"]
    assert report["calibration"]["bos"] is False  # no tokenizer: a data-free plan
    assert totals["params_after"] < totals["params_before"]
    # the planned totals are what was built
    saved = sum(r["params_before"] - r["params_after"] for r in report["modules"])
    assert totals["params_before"] - totals["params_after"] == saved
    saved = sum(r["bits_before"] - r["bits_after"] for r in report["modules"])
    assert totals["bits_before"] - totals["bits_after"] == saved
    model = spectra.load_compressed(out)
    from compressors import io

    _, facts = io.load(out)
    unique = {id(f): f for f in facts.values()}.values()
    saved_bits = sum(r["bits_after"] for r in report["modules"])
    assert sum(f.bits for f in unique) == saved_bits
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(out / "dense").eval()
    x = torch.randint(0, 128, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, plain(x).logits, atol=2e-4, rtol=1e-3)
    assert (tiny_llama_dir / "model.safetensors").is_file()  # source untouched
    del model, plain  # they map OUT's files
    factors = (out / "factors.safetensors").read_bytes()
    (out / "factors.safetensors").write_bytes(factors[:-100])  # OUT cut short
    r = cli("eval", out, "--seqlen", "16", "--max-tokens", "32")
    assert r.returncode == 2 and "truncated safetensors" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda t, p: ["apply", p, "--model", t, "-o", p.parent / "exists"], "already exists"),
        (
            lambda t, p: ["apply", p.parent / "nope.yaml", "--model", t, "-o", p.parent / "o"],
            "cannot read plan",
        ),
        (lambda t, p: ["apply", _bad_plan(p), "--model", t, "-o", p.parent / "o"], "bits=1"),
        (
            lambda t, p: (
                ["apply", _bad_plan(p, method="prune", pattern="3:2"), "--model", t]
                + ["-o", p.parent / "o"]
            ),
            "pattern='3:2'",
        ),
        (  # 64 input features do not split into groups of 5
            lambda t, p: (
                ["apply", _bad_plan(p, method="prune", pattern="2:5"), "--model", t]
                + ["-o", p.parent / "o"]
            ),
            "divisible by 5",
        ),
        (
            lambda t, p: ["apply", _gpt2_plan(p), "--model", t, "-o", p.parent / "o"],
            "match no module",
        ),
        (lambda t, p: ["eval", _corrupt_out(p)], "corrupt compressed checkpoint"),
    ],
    ids=[
        "out-exists",
        "no-plan",
        "bad-bits",
        "pattern-3:2",
        "pattern-indivisible",
        "other-architecture",
        "corrupt-out",
    ],
)
def test_bad_apply_and_eval_inputs_exit_2(tiny_llama_dir, plan_file, make, match, cli):
    (plan_file.parent / "exists").mkdir()
    r = cli(*make(tiny_llama_dir, plan_file))
    assert r.returncode == 2, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and match in r.stderr
    assert not (plan_file.parent / "o").exists()


def _bad_plan(p, **config):
    q = p.parent / "bad.yaml"
    config = config or {"method": "quant", "bits": 1}
    q.write_text(yaml.safe_dump({"layers": {"model.layers.0.mlp.up_proj": config}}))
    return q


def _gpt2_plan(p):
    q = p.parent / "gpt2.yaml"
    q.write_text(
        yaml.safe_dump(
            {
                "rules": [
                    {
                        "targets": [r"re:transformer\.h\.\d+\.mlp\.c_fc"],
                        "method": "lowrank",
                        "rank": 4,
                    }
                ]
            }
        )
    )
    return q


def _corrupt_out(p):
    out = p.parent / "corrupt"
    out.mkdir()
    (out / "manifest.json").write_text("{")
    (out / "factors.safetensors").write_bytes(b"\0" * 10)
    (out / "tokenizer_config.json").write_text("{}")
    return out


def test_an_interrupted_apply_leaves_no_out_and_the_source_intact(
    tiny_llama_dir, plan_file, tmp_path, monkeypatch, capsys
):
    from compressors import apply as applying

    before = (tiny_llama_dir / "model.safetensors").read_bytes()
    calls = {"n": 0}
    real = applying.compress

    def failing(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("injected failure")
        return real(*a, **k)

    monkeypatch.setattr(applying, "compress", failing)
    out = tmp_path / "out"
    assert main(["apply", str(plan_file), "--model", str(tiny_llama_dir), "-o", str(out)]) == 1
    assert "injected failure" in capsys.readouterr().err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert (tiny_llama_dir / "model.safetensors").read_bytes() == before


def test_a_failure_while_writing_leaves_no_out(tiny_llama_dir, plan_file, tmp_path, monkeypatch):
    from compressors import io

    def broken(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(io, "save_file", broken)
    out = tmp_path / "out"
    assert main(["apply", str(plan_file), "--model", str(tiny_llama_dir), "-o", str(out)]) == 1
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_calibration_windows_start_with_bos_where_the_tokenizer_adds_one(family_dir, tmp_path, cli):
    from spectra.data.calibration import CalibrationSpec, calibration_windows

    path = family_dir("llama")
    tok = open_model(str(path)).tokenizer()
    windows = calibration_windows(tok, CalibrationSpec(samples=3, seqlen=32))
    assert windows.shape == (3, 32) and (windows[:, 0] == tok.bos_token_id).all()
    plan = tmp_path / "wanda.yaml"
    plan.write_text(
        yaml.safe_dump(
            {
                "calibration": {"samples": 2, "seqlen": 32},
                "rules": [{"targets": [r"re:.*\.mlp\.up_proj"], "method": "prune", "wanda": True}],
            }
        )
    )
    r = cli("apply", plan, "--model", path, "-o", tmp_path / "out")
    assert r.returncode == 0, r.stderr
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["calibration"]["bos"] is True and report["calibration_tokens"] == 64


def test_sequential_calibration_is_cached_under_the_plan_and_repeats_exactly(
    family_dir, tmp_path, cli, isolated_cache
):
    """`calibration.sequential`: the first apply records the plan's own Grams, a repeat
    reads them (same result), a different plan records its own; the model's dense
    calibration (what `latest` and plan auto find) is not among them."""
    from safetensors.torch import load_file

    from spectra.data import calibration

    path = family_dir("qwen2")
    rules = [{"targets": [r"re:.*\.mlp\..*"], "method": "quant", "bits": 3, "group_size": 16}]
    rules[0]["gptq"] = True
    calib = {"samples": 3, "seqlen": 32, "sequential": True}
    plan = tmp_path / "seq.yaml"
    plan.write_text(yaml.safe_dump({"calibration": calib, "rules": rules}))
    outs = []
    for i in range(2):
        out = tmp_path / f"out{i}"
        r = cli("apply", plan, "--model", path, "-o", out)
        assert r.returncode == 0, r.stderr
        report = json.loads((out / "report.json").read_text())
        assert report["calibration"]["sequential"] is True
        assert report["calibration_cached"] is (i == 1) and report["calibration_tokens"] == 96
        outs.append(load_file(out / "factors.safetensors"))
    assert outs[0].keys() == outs[1].keys() and len(outs[0]) > 0
    assert all(torch.equal(outs[0][k], outs[1][k]) for k in outs[0])
    folders = [p.parent for p in (isolated_cache / "calibration").glob("*/meta.json")]
    assert len(folders) == 1 and calibration.latest(open_model(str(path))) is None
    rules[0]["bits"] = 4
    plan.write_text(yaml.safe_dump({"calibration": calib, "rules": rules}))
    r = cli("apply", plan, "--model", path, "-o", tmp_path / "out4")
    assert r.returncode == 0, r.stderr
    assert len(list((isolated_cache / "calibration").glob("*/meta.json"))) == 2
    calib["sequential"] = "yes"
    plan.write_text(yaml.safe_dump({"calibration": calib, "rules": rules}))
    r = cli("apply", plan, "--model", path, "-o", tmp_path / "bad")
    assert r.returncode == 2 and "calibration.sequential" in r.stderr
    assert not (tmp_path / "bad").exists()


def test_the_report_names_knobs_that_differ_from_their_resolved_defaults():
    """GPTQ's act_order and observer follow gptq: plain GPTQ shows neither, an explicit
    act_order: false is shown."""
    from compressors.registry import make_config
    from spectra.cli.plan import _settings

    assert _settings(make_config("quant", bits=3)) == "quant(bits=3)"
    assert _settings(make_config("quant", bits=3, gptq=True)) == "quant(bits=3, gptq=True)"
    off = make_config("quant", bits=3, gptq=True, act_order=False, observer="minmax")
    assert _settings(off) == "quant(bits=3, gptq=True, act_order=False, observer=minmax)"
    assert _settings(make_config("lowrank", rank=8)) == "lowrank(rank=8)"
