"""apply_plan and compressors.apply: module surgery on a tiny Llama, reports, calibration."""

import pytest
import torch

from compressors import activations
from compressors import apply as applying
from compressors.base import DENSE_BITS
from spectra.plan import format as plans
from spectra.plan import run
from spectra.plan.format import PlanError


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()


def calib_ids(n=6, seqlen=16):
    return torch.randint(0, 128, (n, seqlen), generator=torch.Generator().manual_seed(0))


PLAN = {
    "rules": [
        {"targets": [r"re:model\.layers\.\d+\.self_attn\.[qk]_proj"], "method": "joint", "rank": 8},
        {
            "targets": [r"re:model\.layers\.\d+\.mlp\.(gate|up)_proj"],
            "method": "lowrank",
            "rank": 12,
        },
    ],
    "layers": {
        "model.layers.0.mlp.down_proj": {"method": "mpo", "cores": 2, "bond_dim": 6},
        "model.layers.1.mlp.down_proj": {"method": "losparse", "rank": 4, "sparsity": 0.9},
        "model.layers.1.self_attn.o_proj": {"method": "prune", "sparsity": 0.5},
        "model.layers.0.self_attn.o_proj": {"method": "quant", "bits": 4, "group_size": 16},
    },
}


def test_apply_replaces_planned_modules_and_leaves_the_source(tiny):
    before = {k: v.clone() for k, v in tiny.state_dict().items()}
    plan = plans.parse(PLAN)
    model, reports, facts = run.apply_plan(tiny, plan)
    assert all(torch.equal(v, tiny.state_dict()[k]) for k, v in before.items())
    assert len(reports) == 12 and set(facts) == {r.name for r in reports}
    layer0 = model.model.layers[0]
    assert type(layer0.mlp.gate_proj).__name__ == "LowRankLinear"
    assert type(layer0.self_attn.q_proj).__name__ == "JointMemberLinear"
    assert layer0.self_attn.q_proj.shared is layer0.self_attn.k_proj.shared
    assert type(layer0.mlp.down_proj).__name__ == "MPOLinear"
    # the compressed model computes what its dense reconstruction computes
    dense = applying.copy.deepcopy(tiny)
    for name, f in facts.items():
        w = (
            f.member_dense(["q_proj", "k_proj"].index(name.rsplit(".", 1)[1]))
            if type(f).__name__ == "JointGroup"
            else f.to_dense()
        )
        dense.get_submodule(name).weight.data = w.to(torch.float32)
    x = calib_ids(2, 12)
    torch.testing.assert_close(model(x).logits, dense(x).logits, atol=2e-4, rtol=1e-3)
    by = {r.name: r for r in reports}
    up = by["model.layers.1.mlp.up_proj"]
    assert (up.params_after, up.bits_after) == (12 * 160, DENSE_BITS * 12 * 160)
    assert 0 < up.rel_error < 1 and up.calib_error is None


def test_data_aware_plans_calibrate_block_by_block(tiny):
    plan = plans.parse(
        {
            "rules": [
                {
                    "targets": [r"re:model\.layers\.\d+\.mlp\.down_proj"],
                    "method": "quant",
                    "bits": 3,
                    "group_size": 16,
                    "gptq": True,
                },
                {
                    "targets": [r"re:model\.layers\.\d+\.self_attn\.[qkv]_proj"],
                    "method": "lowrank",
                    "rank": 8,
                    "whiten": True,
                },
            ]
        }
    )
    ids = calib_ids()
    model, reports, _ = run.apply_plan(tiny, plan, activations.collect(tiny, ids))
    assert all(r.calib_error is not None and r.calib_error > 0 for r in reports)
    # the Hessian of layer 1's down_proj is what its input really is in the dense model
    grab = {}
    hook = tiny.model.layers[1].mlp.down_proj.register_forward_pre_hook(
        lambda m, i: grab.setdefault("x", []).append(i[0].detach())
    )
    with torch.no_grad():
        for lo in range(0, ids.shape[0], 4):
            tiny(ids[lo : lo + 4])
    hook.remove()
    x = torch.cat([t.reshape(-1, t.shape[-1]) for t in grab["x"]]).double()
    h = x.T @ x
    gptq_plain = applying.compress(
        tiny.model.layers[1].mlp.down_proj.weight.detach(),
        plan.rules[0].config,
        applying.Calibration(h, x.shape[0]),
    )
    got = model.model.layers[1].mlp.down_proj
    assert torch.equal(got.codes, gptq_plain.codes)


def test_data_aware_plan_without_calibration_is_refused(tiny):
    plan = plans.parse(
        {
            "rules": [
                {
                    "targets": ["model.layers.0.mlp.up_proj"],
                    "method": "prune",
                    "sparsity": 0.5,
                    "wanda": True,
                }
            ]
        }
    )
    with pytest.raises(PlanError, match="calibration is required"):
        run.apply_plan(tiny, plan)


def test_save_and_load_give_the_same_logits(tiny, tmp_path):
    from compressors import io

    plan = plans.parse(PLAN)
    model, reports, facts = run.apply_plan(tiny, plan)
    report = {"modules": [applying.asdict(r) for r in reports]}
    io.save(tmp_path / "out", model, facts, plans.dumps(plan), report, dense=True)
    again, facts2 = io.load(tmp_path / "out")
    x = calib_ids(2, 12)
    with torch.no_grad():
        torch.testing.assert_close(again(x).logits, model(x).logits, atol=1e-5, rtol=1e-5)
    assert {k: type(v).__name__ for k, v in facts2.items()} == {
        k: type(v).__name__ for k, v in facts.items()
    }
    q, k = again.model.layers[1].self_attn.q_proj, again.model.layers[1].self_attn.k_proj
    assert q.shared is k.shared  # the joint group is one group again
    assert sum(f.bits for f in {id(f): f for f in facts2.values()}.values()) == sum(
        f.bits for f in {id(f): f for f in facts.values()}.values()
    )
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "dense").eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(x).logits, model(x).logits, atol=2e-4, rtol=1e-3)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_existing_out_is_refused_and_corrupt_checkpoints_are_input_errors(tiny, tmp_path):
    from compressors import io
    from spectra.errors import SpectraInputError

    plan = plans.parse(PLAN)
    model, reports, facts = run.apply_plan(tiny, plan)
    io.save(tmp_path / "out", model, facts, "", {})
    with pytest.raises(SpectraInputError, match="already exists"):
        io.save(tmp_path / "out", model, facts, "", {})
    io.save(tmp_path / "out", model, facts, "", {}, force=True)  # replaced whole
    data = (tmp_path / "out" / "factors.safetensors").read_bytes()
    (tmp_path / "out" / "factors.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(SpectraInputError, match="corrupt compressed checkpoint"):
        io.load(tmp_path / "out")
