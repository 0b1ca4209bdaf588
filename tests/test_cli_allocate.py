"""`spectra plan auto --allocate`: every strategy meets the budget as `plan show` accounts
it and records itself in the plan; floors and keep-dense hold; bad input exits 2."""

import json

import pytest
import yaml


def auto(cli, model, *args):
    return cli("plan", "auto", model, *args)


@pytest.mark.parametrize(
    "method,strategy,budget",
    [
        ("prune", "alpha", ("--target-params", "0.4")),
        ("lowrank", "farms", ("--target-params", "0.6")),
        ("losparse", "uniform", ("--target-params", "0.7")),
        ("quant", "alpha", ("--target-bits", "3.5")),
    ],
)
def test_each_strategy_meets_the_budget_as_plan_show_accounts_it(
    tiny_llama_dir, tmp_path, cli, method, strategy, budget
):
    out = tmp_path / "plan.yaml"
    args = ("--method", method, *budget, "--allocate", strategy, "--min-rank", "down=0.25")
    keep = r"model\.layers\.0\.self_attn\.q_proj"
    r = auto(cli, tiny_llama_dir, *args, "--keep-dense", keep, "-o", out, "--json")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["allocate"] == strategy
    plan = yaml.safe_load(out.read_text())
    assert plan["allocation"]["strategy"] == strategy
    assert "model.layers.0.self_attn.q_proj" not in plan["layers"]
    shown = cli("plan", "show", out, "--model", tiny_llama_dir, "--json")
    assert shown.returncode == 0, shown.stderr
    totals = json.loads(shown.stdout)["totals"]
    target = float(budget[1])
    spent = totals["params_after" if budget[0] == "--target-params" else "bits_after"]
    assert spent == summary["spent"] <= target * totals["params_before"]
    biggest = max(e["params_before"] for e in json.loads(shown.stdout)["modules"])
    per = 16 if budget[0] == "--target-bits" else 1
    assert summary["spent"] >= target * totals["params_before"] - per * biggest


def test_owl_on_a_calibrated_model_records_its_band(family_dir, tmp_path, cli):
    path = family_dir("llama")
    out = tmp_path / "plan.yaml"
    r = auto(
        cli,
        path,
        "--method",
        "prune",
        "--target-params",
        "0.5",
        "--allocate",
        "owl",
        "--owl-band",
        "0.1",
        "--tokens",
        "1024",
        "-o",
        out,
        "--json",
    )
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["sensitivity"] == "calib" and summary["spent"] <= summary["budget"]
    plan = yaml.safe_load(out.read_text())
    assert plan["allocation"]["strategy"] == "owl" and plan["allocation"]["band"] == 0.1
    assert set(plan["allocation"]["blocks"]) == {0, 1}
    assert plan["allocation"]["fallback"] == {"lm_head": "global mean"}  # no Gram: no ratio
    windows = plan["allocation"]["calibration"]
    assert windows["samples"] * windows["seqlen"] == 1024
    assert any(v["wanda"] or v["sparsegpt"] for v in plan["layers"].values())
    # data-free damage: magnitude pruning, the ratios on the newest cached calibration
    out2 = tmp_path / "plan2.yaml"
    r = auto(
        cli,
        path,
        "--method",
        "prune",
        "--target-params",
        "0.5",
        "--allocate",
        "owl",
        "--sensitivity",
        "none",
        "-o",
        out2,
    )
    assert r.returncode == 0, r.stderr
    plan2 = yaml.safe_load(out2.read_text())
    assert plan2["allocation"]["calibration"] == windows
    assert plan2["allocation"]["blocks"] == plan["allocation"]["blocks"]
    assert not any(v["wanda"] or v["sparsegpt"] for v in plan2["layers"].values())


@pytest.mark.parametrize(
    "args,match",
    [
        (("--allocate", "bogus"), "--allocate bogus: use one of loss, uniform"),
        (("--allocate", "owl"), "--allocate owl needs a calibration"),
        (("--allocate", "alpha", "--alpha-e", "0"), "--alpha-e 0.0: must be in (0, 1)"),
        (("--allocate", "farms", "--alpha-e", "1"), "--alpha-e 1.0: must be in (0, 1)"),
        (("--allocate", "owl", "--owl-band", "1.5"), "--owl-band 1.5: must be in (0, 1)"),
        (("--allocate", "owl", "--owl-band", "-0.1"), "--owl-band -0.1: must be in (0, 1)"),
    ],
)
def test_bad_strategies_exit_2_with_one_line_and_write_nothing(
    tiny_llama_dir, tmp_path, cli, args, match
):
    out = tmp_path / "plan.yaml"
    r = auto(cli, tiny_llama_dir, "--method", "prune", "--target-params", "0.5", *args, "-o", out)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and match in lines[0], r.stderr
    assert not out.exists()
