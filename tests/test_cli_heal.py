"""`spectra apply` with a plan's `heal:` and `spectra heal OUT -o OUT2`: outputs, resume
after Ctrl-C, refusals."""

import json

import pytest
import torch
import yaml

from spectra.cli import main

HEAL = {
    "steps": 2,
    "tokens_per_step": 64,
    "seqlen": 32,
    "lr": 1e-2,
    "eval_every": 1,
    "eval_tokens": 64,
    "checkpoint_every": 1,
}
PLAN = {
    "version": 1,
    "rules": [
        {
            "targets": [r"re:model\.layers\.\d+\.mlp\.(gate|up)_proj"],
            "method": "lowrank",
            "rank": 7,
        },
        {"targets": [r"re:model\.layers\.\d+\.self_attn\.[qk]_proj"], "method": "joint", "rank": 8},
        {"targets": [r"re:model\.layers\.\d+\.mlp\.down_proj"], "method": "mpo", "bond_dim": 6},
    ],
    "heal": HEAL,
}


@pytest.fixture()
def model_dir(family_dir):
    return family_dir("llama")


def write_plan(path, plan):
    path.write_text(yaml.safe_dump(plan))
    return path


def files(folder):
    return {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_apply_heals_and_heal_continues_from_an_out(model_dir, tmp_path, cli):
    import spectra

    plan = write_plan(tmp_path / "plan.yaml", PLAN)
    out = tmp_path / "out"
    r = cli("apply", plan, "--model", model_dir, "-o", out)
    assert r.returncode == 0, r.stderr
    assert "healed 2 steps" in r.stdout
    report = json.loads((out / "report.json").read_text())
    section = report["heal"]
    assert [p["step"] for p in section["curve"]] == [0, 1, 2]
    assert section["ppl_before"] == section["curve"][0]["ppl"]
    assert section["steps"] == 2 and len(section["losses"]) == 2
    assert section["settings"]["lr"] == 1e-2 and section["trainable_params"] > 0
    assert not (tmp_path / ".out.heal").exists()  # the checkpoint goes once OUT is whole

    before = files(out)
    out2 = tmp_path / "out2"
    r = cli("heal", out, "-o", out2, "--steps", "3", "--json")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["steps"] == 3 and summary["out"] == str(out2)
    assert files(out) == before  # the source OUT is untouched
    healed = json.loads((out2 / "report.json").read_text())["heal"]
    assert healed["previous"]["steps"] == 2 and healed["settings"]["steps"] == 3
    assert healed["curve"][0]["ppl"] == pytest.approx(section["curve"][-1]["ppl"], rel=1e-6)
    a = spectra.load_compressed(out)
    b = spectra.load_compressed(out2)
    x = torch.randint(0, 300, (1, 16))
    with torch.no_grad():
        assert not torch.equal(a(x).logits, b(x).logits)
    up_a = a.get_submodule("model.layers.0.mlp.up_proj")
    up_b = b.get_submodule("model.layers.0.mlp.up_proj")
    assert type(up_b).__name__ == "LowRankLinear" and not torch.equal(up_a.a, up_b.a)
    emb = "model.embed_tokens.weight"
    assert torch.equal(a.state_dict()[emb], b.state_dict()[emb])


def test_an_interrupted_heal_leaves_a_checkpoint_and_resumes(model_dir, tmp_path, monkeypatch):
    from spectra.data import heal

    plan = write_plan(tmp_path / "plan.yaml", PLAN)  # checkpoints every step
    out = tmp_path / "out"
    assert main(["apply", str(plan), "--model", str(model_dir), "-o", str(out)]) == 0
    real, calls = heal.distill_loss, {"n": 0}

    def interrupted(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(heal, "distill_loss", interrupted)
    out2 = tmp_path / "out2"
    args = ["heal", str(out), "-o", str(out2), "--steps", "4", "--tokens-per-step", "64"]
    assert main(args) == 130
    assert not out2.exists()
    assert (tmp_path / ".out2.heal" / heal.CHECKPOINT).is_file()  # steps 1 and 2 done
    monkeypatch.setattr(heal, "distill_loss", real)
    assert main(args) == 0
    section = json.loads((out2 / "report.json").read_text())["heal"]
    assert section["resumed_from"] == 2 and section["steps"] == 4 and len(section["losses"]) == 4
    assert not (tmp_path / ".out2.heal").exists()


@pytest.mark.parametrize(
    ("heal_raw", "match"),
    [
        ({"steps": 0}, "heal.steps=0"),
        ({"lr": -1.0}, "heal.lr=-1.0"),
        ({"lr": 0.0}, "heal.lr=0.0"),
        ({"epochs": 2}, "unknown key 'epochs'"),
    ],
)
def test_bad_heal_sections_exit_2_writing_nothing(model_dir, tmp_path, heal_raw, match, cli):
    plan = write_plan(tmp_path / "plan.yaml", {**PLAN, "heal": heal_raw})
    r = cli("apply", plan, "--model", model_dir, "-o", tmp_path / "out")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and match in lines[0], r.stderr
    assert not (tmp_path / "out").exists()


def test_heal_refuses_what_is_not_an_apply_output(model_dir, tmp_path, cli):
    out2 = tmp_path / "out2"
    for args, match in [
        (["heal", model_dir, "-o", out2], "not a `spectra apply` output"),
        (["heal", tmp_path / "missing", "-o", out2], "not a `spectra apply` output"),
    ]:
        r = cli(*args)
        assert r.returncode == 2 and match in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
    assert not out2.exists() and not list(tmp_path.glob(".*"))


def test_heal_refuses_bad_flags_and_an_existing_out2(model_dir, tmp_path):
    plan = write_plan(tmp_path / "plan.yaml", {**PLAN, "heal": None})
    out = tmp_path / "out"
    assert main(["apply", str(plan), "--model", str(model_dir), "-o", str(out)]) == 0
    (tmp_path / "exists").mkdir()
    for args in (
        ["heal", str(out), "-o", str(tmp_path / "o2"), "--steps", "0"],
        ["heal", str(out), "-o", str(tmp_path / "o2"), "--lr", "-1"],
        ["heal", str(out), "-o", str(tmp_path / "exists")],
        ["heal", str(out), "-o", str(out)],
    ):
        assert main(args) == 2, args
    assert not (tmp_path / "o2").exists() and not list((tmp_path / "exists").iterdir())


def test_heal_that_does_not_fit_is_refused_before_any_work(tmp_path, cli, monkeypatch):
    """Exit 2 and one line naming the memory healing needs and what is free."""
    from conftest import save_tiny_llama

    model = save_tiny_llama(tmp_path / "m")
    plan = tmp_path / "plan.yaml"
    plan.write_text(
        "version: 1\nrules:\n  - targets: ['re:.*mlp.*']\n    method: lowrank\n    rank: 4\n"
    )
    r = cli("apply", plan, "--model", model, "-o", tmp_path / "out")
    assert r.returncode == 0, r.stderr
    monkeypatch.setenv("SPECTRA_MEMORY_GB", "0.0001")
    r = cli("heal", tmp_path / "out", "-o", tmp_path / "healed", "--steps", 1)
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert "healing needs about" in r.stderr and "GB is free" in r.stderr
    r = cli("heal", tmp_path / "out", "-o", tmp_path / "healed", "--offload", "disk")
    assert r.returncode == 2 and "--offload disk" in r.stderr
    assert not (tmp_path / "healed").exists()
