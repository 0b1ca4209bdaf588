"""Plans: parsing, every validation error, full-match targets, resolution and costs."""

import json

import pytest
import yaml

from spectra.io.model import open_model
from spectra.plan import format as plans
from spectra.plan.format import PlanError

GOOD = {
    "version": 1,
    "model": "tiny",
    "calibration": {"corpus": "builtin", "samples": 8, "seqlen": 64, "seed": 0},
    "rules": [
        {
            "targets": [r"re:model\.layers\.\d+\.mlp\.(gate|up)_proj"],
            "ignore": [r"re:model\.layers\.0\..*"],
            "method": "lowrank",
            "rank": 16,
        },
        {"targets": [r"re:model\.layers\.\d+\.self_attn\.[qk]_proj"], "method": "joint", "rank": 8},
    ],
    "layers": {
        "model.layers.0.mlp.down_proj": {"method": "quant", "bits": 4, "group_size": 32},
        "model.layers.1.self_attn.o_proj": {"method": "losparse", "rank": 4, "sparsity": 0.9},
        "model.layers.1.mlp.down_proj": {"method": "mpo", "cores": 2, "bond_dim": 8},
    },
}


def mats(tiny_llama_dir):
    return open_model(str(tiny_llama_dir)).matrices


def test_round_trip_through_yaml_and_json():
    plan = plans.parse(GOOD)
    for fmt in ("yaml", "json"):
        again = plans.parse(yaml.safe_load(plans.dumps(plan, fmt)))
        assert plans.to_dict(again) == plans.to_dict(plan)
    assert plans.to_dict(plan)["rules"][0]["rank"] == 16


def test_exponent_floats_read_as_numbers_in_json_and_yaml(tmp_path):
    """JSON's 1e-05 and YAML's 1e-5 (text to PyYAML's YAML 1.1 loader) are numbers; a
    quoted one stays text."""
    heal = {"steps": 4, "lr": 1e-5}
    (tmp_path / "p.json").write_text(json.dumps({**GOOD, "heal": heal}))
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(GOOD) + "heal:\n  steps: 4\n  lr: 1e-5\n")
    for name in ("p.json", "p.yaml"):
        assert plans.load(tmp_path / name).heal.lr == 1e-5
    assert plans.loads("a: 2e3\nb: -1.5E-2\nc: 7\nd: 1e\ne: '1e-5'\n") == {
        "a": 2000.0,
        "b": -0.015,
        "c": 7,
        "d": "1e",
        "e": "1e-5",
    }


def test_resolution_first_match_layers_win_and_costs(tiny_llama_dir):
    entries = {e.name: e for e in plans.resolve(plans.parse(GOOD), mats(tiny_llama_dir))}
    up1 = entries["model.layers.1.mlp.up_proj"]
    assert up1.source == "rules[0]" and (up1.params_after, up1.bits_after) == (
        16 * 160,
        16 * 16 * 160,
    )
    assert entries["model.layers.0.mlp.up_proj"].source is None  # ignored by the rule
    assert entries["model.layers.0.mlp.down_proj"].source == "layers"
    assert entries["model.embed_tokens"].source is None  # embeddings are never targets
    q, k = entries["model.layers.1.self_attn.q_proj"], entries["model.layers.1.self_attn.k_proj"]
    assert q.group == k.group == "model.layers.1.self_attn"
    assert q.params_after + k.params_after == 8 * (64 + 32 + 64)  # k (n + m_q + m_k)
    down = entries["model.layers.0.mlp.down_proj"]
    assert down.bits_after == 4 * 64 * 96 + 32 * 64 * 3


def test_targets_must_match_the_whole_name(tiny_llama_dir):
    prefix = {"rules": [{"targets": [r"re:model\.layers\.1"], "method": "prune", "sparsity": 0.5}]}
    with pytest.raises(PlanError, match=r"rules\[0\]\.targets.*match no module"):
        plans.resolve(plans.parse(prefix), mats(tiny_llama_dir))
    whole = {
        "rules": [
            {"targets": [r"re:model\.layers\.1\..*_proj"], "method": "prune", "sparsity": 0.5}
        ]
    }
    entries = plans.resolve(plans.parse(whole), mats(tiny_llama_dir))
    assert sum(e.source is not None for e in entries) == 7


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda d: d.update(extra=1), "unknown key 'extra'"),
        (lambda d: d.update(version=2), "version=2"),
        (lambda d: d["rules"][0].update(method="svd"), r"rules\[0\].*method='svd'.*unknown method"),
        (lambda d: d["rules"][0].update(bits=4), r"rules\[0\].*lowrank: bits=4: not a setting"),
        (lambda d: d["layers"]["model.layers.0.mlp.down_proj"].update(bits=9), "bits=9"),
        (
            lambda d: d["layers"]["model.layers.1.self_attn.o_proj"].update(sparsity=1.0),
            "sparsity=1.0",
        ),
        (lambda d: d["rules"][0].update(targets=["re:model\\.layers\\.("]), "does not compile"),
        (lambda d: d["rules"][0].pop("targets"), "at least one target"),
        (lambda d: d["rules"][0].pop("method"), r"rules\[0\]\.method: missing"),
        (lambda d: d["calibration"].update(samples=0), "calibration.samples=0"),
        (lambda d: d["calibration"].update(dataset="x"), "unknown key 'dataset'"),
    ],
)
def test_invalid_plans_name_field_and_value(mutate, match):
    data = json.loads(json.dumps(GOOD))
    mutate(data)
    with pytest.raises(PlanError, match=match) as e:
        plans.parse(data)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "layers,match",
    [
        (
            {"model.layers.0.self_attn.k_proj": {"method": "lowrank", "rank": 33}},
            r"model\.layers\.0\.self_attn\.k_proj: lowrank: rank=33: above min\(m, n\) = 32",
        ),
        ({"model.layers.7.mlp.up_proj": {"method": "prune"}}, "no such module"),
    ],
)
def test_plans_that_do_not_fit_the_model(tiny_llama_dir, layers, match):
    with pytest.raises(PlanError, match=match):
        plans.resolve(plans.parse({"layers": layers}), mats(tiny_llama_dir))


def test_a_plan_for_another_architecture_is_refused(tiny_llama_dir):
    gpt2 = {
        "rules": [
            {"targets": [r"re:transformer\.h\.\d+\.mlp\.c_fc"], "method": "lowrank", "rank": 8}
        ]
    }
    with pytest.raises(PlanError, match="match no module"):
        plans.resolve(plans.parse(gpt2), mats(tiny_llama_dir))


def test_energy_rules_are_costed_from_the_spectrum(tiny_llama_dir):
    plan = plans.parse(
        {"rules": [{"targets": ["model.layers.0.mlp.up_proj"], "method": "lowrank", "energy": 0.9}]}
    )
    with pytest.raises(PlanError, match="needs the model's spectra"):
        plans.resolve(plan, mats(tiny_llama_dir))
    (e,) = [
        x for x in plans.resolve(plan, mats(tiny_llama_dir), rank_of=lambda n, q: 5) if x.source
    ]
    assert e.params_after == 5 * (96 + 64)


def test_plan_show_cli(tiny_llama_dir, tmp_path, cli):
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(GOOD))
    r = cli("plan", "show", str(path), "--model", str(tiny_llama_dir), "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    # 2 blocks x 7 linears + the untied lm_head; the embedding is not a linear layer
    assert out["totals"]["compressed"] == 9 and out["totals"]["modules"] == 15
    assert out["totals"]["params_after"] < out["totals"]["params_before"]
    bad = tmp_path / "bad.yaml"
    bad.write_text("rules:\n  - targets: ['re:(']\n    method: prune\n")
    r = cli("plan", "show", str(bad), "--model", str(tiny_llama_dir))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "does not compile" in r.stderr


def test_recorded_shapes_round_trip_and_are_validated():
    data = {
        "layers": {
            "model.layers.0.mlp.up_proj": {"method": "lowrank", "rank": 4, "shape": [96, 64]}
        }
    }
    plan = plans.parse(data)
    assert plan.shapes == {"model.layers.0.mlp.up_proj": (96, 64)}
    assert plans.parse(plans.to_dict(plan)) == plan
    data["layers"]["model.layers.0.mlp.up_proj"]["shape"] = [96]
    with pytest.raises(plans.PlanError, match=r"layers.model.layers.0.mlp.up_proj.shape=\[96\]"):
        plans.parse(data)


def test_app_rows_carry_the_prune_pattern():
    from spectra.plan import edit as pe

    row = dict(module="x", role="down", block=0, m=8, n=16, method="prune")
    settings = pe.settings_of({**row, "sparsity": 0.7, "pattern": "2:4", "calibrated": True})
    assert settings == {"method": "prune", "pattern": "2:4", "wanda": True}
    config = pe.config_of(settings)
    assert config.sparsity == 0.5

    class Mat:
        name, role, block, shape = "x", "down", 0, (8, 16)

    assert pe.row(Mat, settings)["pattern"] == "2:4"
    assert pe.settings_of({**row, "sparsity": 0.7, "pattern": None})["sparsity"] == 0.7
