"""`spectra plan auto`: budgets met exactly as `plan show` accounts them; bad input."""

import json

import pytest
import yaml


def auto(cli, model, *args):
    return cli("plan", "auto", model, *args)


@pytest.mark.parametrize(
    "method,budget",
    [
        ("lowrank", ("--target-params", "0.5")),
        ("joint", ("--target-params", "0.4")),
        ("losparse", ("--target-params", "0.6")),
        ("mpo", ("--target-params", "0.5")),
        ("quant", ("--target-bits", "3.5")),
        ("caldera", ("--target-bits", "7")),
        ("mixed", ("--target-bits", "3")),
    ],
)
def test_budget_is_met_as_plan_show_accounts_it(tiny_llama_dir, tmp_path, cli, method, budget):
    out = tmp_path / "plan.yaml"
    r = auto(cli, tiny_llama_dir, "--method", method, *budget, "-o", out, "--json")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    plan = yaml.safe_load(out.read_text())
    assert plan["layers"], "an explicit per-module plan"
    assert {v["method"] for v in plan["layers"].values()} <= (
        {"lowrank", "joint"}
        if method == "joint"
        else {"lowrank", "quant", "prune"}
        if method == "mixed"
        else {method}
    )
    shown = cli("plan", "show", out, "--model", tiny_llama_dir, "--json")
    assert shown.returncode == 0, shown.stderr
    totals = json.loads(shown.stdout)["totals"]
    target = float(budget[1])
    if budget[0] == "--target-params":
        assert totals["params_after"] == summary["spent"] <= target * totals["params_before"]
        assert totals["params_ratio"] == pytest.approx(summary["params_ratio"])
    else:
        assert totals["bits_after"] == summary["spent"] <= target * totals["params_before"]
        assert totals["bits_per_param"] == pytest.approx(summary["bits_per_param"])
    # the budget is used, not left idle: within one module's dense size of the target
    biggest = max(e["params_before"] for e in json.loads(shown.stdout)["modules"])
    per = 16 if budget[0] == "--target-bits" else 1
    assert summary["spent"] >= target * totals["params_before"] - per * biggest


def test_floors_and_keep_dense_are_honoured(tiny_llama_dir, tmp_path, cli):
    out = tmp_path / "plan.yaml"
    r = auto(
        cli,
        tiny_llama_dir,
        "--method",
        "lowrank",
        "--target-params",
        "0.6",
        "--min-rank",
        "down=0.5",
        "--keep-dense",
        r"model\.layers\.0\..*",
        "-o",
        out,
    )
    assert r.returncode == 0, r.stderr
    assert "parameters kept" in r.stdout
    text = out.read_text()
    layers = yaml.safe_load(text)["layers"]
    assert not any(k.startswith("model.layers.0.") for k in layers)
    # every module is accounted for: its setting, or listed as left dense
    dense = [line.strip("# ").strip() for line in text.split("# left dense:\n")[1].splitlines()]
    assert set(dense) | set(layers) == {
        f"model.layers.{b}.{m}"
        for b in (0, 1)
        for m in (
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
            "mlp.down_proj",
        )
    } | {"lm_head"}
    assert not set(dense) & set(layers)
    for name, s in layers.items():
        if name.endswith("down_proj"):
            assert s["rank"] >= 32  # min(64, 96) / 2


@pytest.mark.parametrize(
    "args,match",
    [
        (("--method", "lowrank", "--target-params", "0.001"), "cannot go below"),
        (("--method", "quant", "--target-params", "0.5"), "cannot go below 1 of the linear"),
        (("--method", "lowrank", "--target-params", "1.5"), "must be in (0, 1]"),
        (("--method", "quant", "--target-bits", "1"), "cannot go below"),
        (
            ("--method", "lowrank", "--target-params", "0.5", "--keep-dense", "nothing.*"),
            "matches no module",
        ),
        (
            ("--method", "lowrank", "--target-params", "0.5", "--keep-dense", "(("),
            "does not compile",
        ),
        (
            ("--method", "lowrank", "--target-params", "0.5", "--min-rank", "bogus=0.5"),
            "ROLE=VALUE",
        ),
        (("--method", "nope", "--target-params", "0.5"), "--method nope"),
        (("--method", "lowrank", "--target-params", "0.5", "--sensitivity", "calib"), "tokenizer"),
        (
            (
                "--method",
                "lowrank",
                "--target-params",
                "0.2",
                "--min-rank",
                "down=1",
                "--min-rank",
                "up=1",
                "--min-rank",
                "gate=1",
            ),
            "cannot go below",
        ),
    ],
)
def test_bad_budgets_exit_2_with_what_is_reachable(tiny_llama_dir, tmp_path, cli, args, match):
    out = tmp_path / "plan.yaml"
    r = auto(cli, tiny_llama_dir, *args, "-o", out)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and match in lines[0], r.stderr
    assert not out.exists()


@pytest.fixture(scope="module")
def wider_llama_dir(tmp_path_factory):
    """Llama module names like tiny_llama_dir's, with wider MLPs (intermediate 128)."""
    from conftest import save_tiny_llama

    return save_tiny_llama(tmp_path_factory.mktemp("wider-llama"), intermediate_size=128)


def test_explicit_entries_are_checked_against_the_model(
    tiny_llama_dir, wider_llama_dir, tmp_path, cli
):
    out = tmp_path / "auto.yaml"
    r = auto(cli, tiny_llama_dir, "--method", "lowrank", "--target-params", "0.5", "-o", out)
    assert r.returncode == 0, r.stderr
    layers = yaml.safe_load(out.read_text())["layers"]
    up = layers["model.layers.0.mlp.up_proj"]
    assert up["shape"] == [96, 64]  # (out, in) as planned
    same = cli("plan", "show", out, "--model", tiny_llama_dir)
    assert same.returncode == 0 and same.stderr == "", same.stderr
    for command in (["plan", "show", out], ["apply", out, "-o", tmp_path / "o"]):
        r = cli(*command, "--model", wider_llama_dir)
        assert r.returncode == 2, r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and "planned for shape" in lines[0], r.stderr
        name = lines[0].split("layers.", 1)[1].split(":")[0]  # the first mismatch, named
        planned = "x".join(map(str, layers[name]["shape"]))
        assert ".mlp." in name and f"planned for shape {planned}, this model's is" in lines[0]
        assert not (tmp_path / "o").exists()


def test_rules_travel_between_models_with_one_warning(
    tiny_llama_dir, wider_llama_dir, tmp_path, cli
):
    plan = tmp_path / "rules.yaml"
    plan.write_text(
        yaml.safe_dump(
            {
                "model": str(tiny_llama_dir),
                "rules": [{"targets": [r"re:.*\.mlp\.up_proj"], "method": "lowrank", "rank": 8}],
            }
        )
    )
    r = cli("plan", "show", plan, "--model", wider_llama_dir, "--json")
    assert r.returncode == 0, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("spectra: warning:") and "made for" in lines[0]
    modules = {m["module"]: m for m in json.loads(r.stdout)["modules"]}
    assert modules["model.layers.1.mlp.up_proj"]["shape"] == "128x64"
    assert modules["model.layers.1.mlp.up_proj"]["params_after"] == 8 * (128 + 64)


def test_an_impossible_budget_fails_before_any_work(tiny_llama_dir, tmp_path, monkeypatch, capsys):
    from spectra.cli import main
    from spectra.plan import auto as autoplan
    from spectra.plan import sensitivity as sens

    def no_work(*a, **k):
        raise AssertionError("weights read or sensitivity computed for an impossible budget")

    monkeypatch.setattr(autoplan, "load_modules", no_work)
    monkeypatch.setattr(sens, "compute", no_work)
    out = tmp_path / "p.yaml"
    argv = ["plan", "auto", str(tiny_llama_dir), "--method", "quant", "--target-bits", "2"]
    assert main([*argv, "--sensitivity", "fisher", "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "quant cannot go below" in err and "bits per linear parameter" in err
    assert not out.exists()


CALIBRATED = {
    "lowrank": ("--target-params", "0.5", {"lowrank": "whiten"}),
    "joint": ("--target-params", "0.5", {"joint": "whiten", "lowrank": "whiten"}),
    "losparse": ("--target-params", "0.6", {"losparse": "whiten"}),
    "mpo": ("--target-params", "0.6", {"mpo": "whiten"}),
    "quant": ("--target-bits", "3.5", {"quant": "gptq"}),
    "mixed": ("--target-bits", "3", {"lowrank": "whiten", "quant": "gptq", "prune": "wanda"}),
}


@pytest.mark.parametrize("method", list(CALIBRATED))
def test_with_a_cached_calibration_plans_are_calibrated_and_apply_reads_it(
    family_dir, tmp_path, cli, method, isolated_cache
):
    """After `spectra calibrate`, `plan auto` scores calibration-weighted damage by default
    and offers the calibrated form of each method; `apply` then reads the same cache."""
    path = family_dir("llama")
    r = cli("calibrate", path, "--tokens", "2048", "--seqlen", "64", "--json")
    assert r.returncode == 0, r.stderr
    out = tmp_path / "plan.yaml"
    flag, target, calibrated = CALIBRATED[method]
    r = auto(cli, path, "--method", method, flag, target, "--tokens", "2048", "-o", out, "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["sensitivity"] == "calib"
    plan = yaml.safe_load(out.read_text())
    assert plan["calibration"]["samples"] * plan["calibration"]["seqlen"] == 2048
    used = {v["method"] for v in plan["layers"].values()}
    assert used and used <= set(calibrated)
    for name, v in plan["layers"].items():  # the LM head has no H: it keeps the plain form
        assert v[calibrated[v["method"]]] is name.startswith("model.layers."), (name, v)
    folders = sorted((isolated_cache / "calibration").iterdir())
    r = cli("apply", out, "--model", path, "-o", tmp_path / "out")
    assert r.returncode == 0, r.stderr
    assert sorted((isolated_cache / "calibration").iterdir()) == folders  # read, not redone


def test_without_a_tokenizer_the_default_damage_is_the_weight_error(tiny_llama_dir, tmp_path, cli):
    """A model that cannot be calibrated falls back to the data-free damage (one warning
    line: tests/test_cli_habits.py); with a tokenizer a small calibration is computed."""
    out = tmp_path / "plan.yaml"
    r = auto(
        cli, tiny_llama_dir, "--method", "lowrank", "--target-params", "0.5", "-o", out, "--json"
    )
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["sensitivity"] == "none"
    assert not any(v.get("whiten") for v in yaml.safe_load(out.read_text())["layers"].values())
