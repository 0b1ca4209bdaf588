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
