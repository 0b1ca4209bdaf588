"""Healing: only compact parameters change, the loss and perplexity fall, an interrupted
run resumes to the same result, and bad settings are refused."""

import json

import pytest
import torch
import torch.nn.functional as F
import yaml

from compressors.factors import dense
from compressors.healing import Trainable
from spectra.data import heal
from spectra.errors import SpectraInputError
from spectra.io.model import open_model
from spectra.plan import run

# one of each healable method, and the frozen ones, cycled over a model's block modules
METHODS = [
    dict(method="lowrank", rank=8),
    dict(method="losparse", rank=4, sparsity=0.9),
    dict(method="mpo", cores=2, bond_dim=4),
    dict(method="caldera", rank=4, bits=2, factor_bits=4, group_size=16, iters=2),
    dict(method="quant", bits=4),
    dict(method="prune", sparsity=0.5),
    dict(method="losparse", rank=4, sparsity=0.9, structured="rows"),
    dict(method="caldera", rank=4, bits=2, factor_bits=16, group_size=16, iters=2),
    dict(method="lowrank", rank=8, factor_bits=4, factor_group_size=16),
    dict(method="mpo", cores=2, bond_dim=4, factor_bits=4, factor_group_size=16),
]
FAST = dict(tokens_per_step=64, seqlen=32, eval_every=0, eval_tokens=64, checkpoint_every=0)


def compressed(path, joint=True):
    """(teacher, student, factorizations, tokenizer) of a saved tiny model under a plan
    that uses every method (joint for q, k where the family has them)."""
    from compressors.apply import linear_targets
    from spectra.data.calibration import calibration_windows
    from spectra.plan import format as plans
    from spectra.plan import run

    model = open_model(str(path), "cpu", "float32", "none").load()
    tok = open_model(str(path)).tokenizer()
    names = [t.name for t, _ in linear_targets(model).values() if t.block is not None]
    rules = []
    if joint and any(n.endswith("self_attn.q_proj") for n in names):
        names = [n for n in names if not n.endswith(("self_attn.q_proj", "self_attn.k_proj"))]
        rules = [{"targets": [r"re:.*\.self_attn\.[qk]_proj"], "method": "joint", "rank": 6}]
    layers = {n: METHODS[i % len(METHODS)] for i, n in enumerate(names)}
    plan = plans.parse(
        dict(version=1, calibration=dict(samples=4, seqlen=32), rules=rules, layers=layers)
    )
    windows = calibration_windows(tok, plan.calibration)
    student, _, facts = run.apply_plan(model, plan, calib_ids=windows)
    return model, student, facts, tok


def frozen_tensors(student, facts) -> dict:
    """Clones of everything healing must not change: the student's tensors outside the
    healable modules, and the frozen parts inside them (CALDERA's Q, sparse supports)."""
    from compressors.caldera import Caldera
    from compressors.losparse import LowRankSparse

    healable = {n for n, f in facts.items() if type(f).__name__ in HEALABLE}
    out = {
        k: (v.to_dense() if v.layout != torch.strided else v).detach().clone()
        for k, v in student.state_dict().items()
        if not any(k.startswith(n + ".") for n in healable) or k.endswith("bias")
    }
    for n, f in facts.items():
        if isinstance(f, Caldera):
            out[f"{n}#q"] = f.q.codes.clone()
            out[f"{n}#qs"] = f.q.scales.clone()
        if isinstance(f, LowRankSparse):
            out[f"{n}#crow"] = f.s.crow.clone()
            out[f"{n}#col"] = f.s.col.clone()
            if f.rows is not None:
                out[f"{n}#rows"] = f.rows.clone()
    return out


HEALABLE = ("LowRank", "JointGroup", "LowRankSparse", "MPO", "Caldera")


def healable_tensors(facts) -> dict:
    out = {}
    for n, f in facts.items():
        kind = type(f).__name__
        if kind == "LowRank":
            out[n] = torch.cat([dense(f.a).flatten(), dense(f.b).flatten()]).clone()
        elif kind == "JointGroup":
            out[n] = torch.cat([f.v.flatten(), *[a.flatten() for a in f.a]]).clone()
        elif kind == "LowRankSparse":
            sparse = f.s.values if f.rows is None else f.row_values
            out[n] = torch.cat([f.a.flatten(), f.b.flatten(), sparse.flatten()]).clone()
        elif kind == "MPO":
            out[n] = torch.cat([dense(c).flatten() for c in f.cores]).clone()
        elif kind == "Caldera":
            out[n] = torch.cat([f.l.to_dense().flatten(), f.r.to_dense().flatten()]).clone()
    return out


@pytest.mark.parametrize("family", ["llama", "gpt2", "phi3", "opt"])
def test_only_compact_parameters_change(family, family_dir):
    teacher, student, facts, tok = compressed(family_dir(family))
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    frozen = frozen_tensors(student, facts)
    trained = healable_tensors(facts)
    kinds = {type(facts[n]).__name__ for n in trained}
    assert kinds >= {"LowRank", "LowRankSparse", "MPO", "Caldera"}, kinds
    config = heal.HealConfig(steps=3, lr=1e-2, **FAST)
    facts, result = heal.heal(student, teacher, facts, tok, config)
    assert result.steps == 3 and len(result.losses) == 3
    after = frozen_tensors(student, facts)
    assert after.keys() == frozen.keys()
    for k, v in frozen.items():
        assert torch.equal(after[k], v), k
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, teacher_before[k]), k
    changed = healable_tensors(facts)
    for n, v in trained.items():
        assert not torch.equal(changed[n], v), n  # every healable module trained
    # the reinstalled compact modules compute what the saved factorizations hold
    for name, f in facts.items():
        module = student.get_submodule(name)
        assert not any(p.requires_grad for p in module.parameters())
        if type(f).__name__ == "JointGroup":
            continue
        x = torch.randn(3, f.shape[1])
        bias = 0 if getattr(module, "bias", None) is None else module.bias
        torch.testing.assert_close(module(x), x @ f.to_dense().T.to(x.dtype) + bias)


def quantized_grids(f) -> list:
    from compressors.factors import QuantizedFactor

    parts = [getattr(f, "a", None), getattr(f, "b", None), *getattr(f, "cores", [])]
    return [(x.q.nbits, x.q.group_size) for x in parts if isinstance(x, QuantizedFactor)]


def test_quantized_factors_return_to_their_grid(family_dir):
    from compressors.caldera import Caldera
    from compressors.quant import Quantized

    teacher, student, facts, tok = compressed(family_dir("llama"), joint=False)
    grids = {n: quantized_grids(f) for n, f in facts.items() if quantized_grids(f)}
    assert {type(facts[n]).__name__ for n in grids} == {"LowRank", "MPO"}
    before = {
        n: (f.l.nbits, f.l.group_size, f.r.nbits, f.r.group_size)
        for n, f in facts.items()
        if isinstance(f, Caldera) and isinstance(f.l, Quantized)
    }
    plain = [n for n, f in facts.items() if isinstance(f, Caldera) and n not in before]
    assert before and plain  # both forms are in the plan
    facts, _ = heal.heal(student, teacher, facts, tok, heal.HealConfig(steps=2, lr=1e-2, **FAST))
    for n, want in before.items():
        f = facts[n]
        assert isinstance(f.l, Quantized) and isinstance(f.r, Quantized)
        assert (f.l.nbits, f.l.group_size, f.r.nbits, f.r.group_size) == want
        assert int(f.l.codes.max()) < 2**f.l.nbits and f.l.codes.dtype == torch.uint8
    assert all(type(facts[n].l).__name__ == "Plain" for n in plain)
    for n, want in grids.items():
        assert quantized_grids(facts[n]) == want, n


@pytest.mark.parametrize("ste", [True, False])
def test_the_straight_through_estimator_saves_what_the_last_step_computed(family_dir, ste):
    """With `ste` the quantized factors train through their grids: the requantized
    model scores exactly what the last step's model did; in float they move off it."""
    teacher, student, facts, tok = compressed(family_dir("llama"), joint=False)
    trained = healable_tensors(facts)
    config = heal.HealConfig(steps=3, lr=1e-2, ste=ste, **dict(FAST, eval_every=3, eval_tokens=256))
    facts, result = heal.heal(student, teacher, facts, tok, config)
    last, saved = result.curve[-2], result.curve[-1]
    assert last["step"] == saved["step"] == 3 and saved.get("requantized")
    if ste:
        assert saved["ppl"] == pytest.approx(last["ppl"], rel=1e-5)
    else:
        assert saved["ppl"] != pytest.approx(last["ppl"], rel=1e-5)
    changed = healable_tensors(facts)
    assert all(not torch.equal(changed[n], v) for n, v in trained.items())  # all trained


@pytest.mark.demo
@pytest.mark.slow
def test_healing_lowers_the_loss_and_the_perplexity_on_the_demo(demo_dir):
    """Block 3..8's MLPs at rank 48: a few distillation steps on calibration tokens lower
    the KL on a held-out calibration batch and the evaluation perplexity."""
    from spectra.plan import format as plans

    teacher = open_model(str(demo_dir), "cpu", "float32", "none").load()
    tok = open_model(str(demo_dir)).tokenizer()
    plan = plans.parse(
        {
            "rules": [
                {
                    "targets": [r"re:model\.layers\.[3-8]\.mlp\.(gate|up|down)_proj"],
                    "method": "lowrank",
                    "rank": 48,
                }
            ]
        }
    )
    student, _, facts = run.apply_plan(teacher, plan)
    config = heal.HealConfig(
        steps=6, tokens_per_step=256, seqlen=128, lr=5e-4, warmup=1, eval_tokens=1024
    )
    windows = heal.train_windows(tok, config, "builtin")
    held_out = windows[-2:]  # the last calibration windows: steps 0..5 read 12 others

    def kl():
        with torch.no_grad():
            return float(
                heal.distill_loss(
                    student(held_out, use_cache=False).logits,
                    teacher(held_out, use_cache=False).logits,
                )[1]
            )

    read = {i for s in range(6) for i in heal.batch_indices(s, 2, windows.shape[0], 0)}
    assert not read & {windows.shape[0] - 2, windows.shape[0] - 1}
    before = kl()
    facts, result = heal.heal(student, teacher, facts, tok, config)
    assert result.losses[-1] < result.losses[0]
    assert kl() < 0.9 * before
    assert result.curve[-1]["ppl"] < 0.9 * result.curve[0]["ppl"], result.curve
    assert result.curve[0]["step"] == 0 and result.curve[-1]["step"] == 6


def test_an_interrupted_run_resumes_to_the_uninterrupted_result(family_dir, tmp_path):
    config = heal.HealConfig(steps=6, lr=1e-2, **{**FAST, "checkpoint_every": 2})

    def run(folder, stop_at=None):
        teacher, student, facts, tok = compressed(family_dir("llama"))

        def after(step):
            if step == stop_at:
                raise KeyboardInterrupt

        facts, result = heal.heal(
            student, teacher, facts, tok, config, checkpoints=folder, after_step=after
        )
        return healable_tensors(facts), result

    want, full = run(tmp_path / "a")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b", stop_at=3)  # steps 1-3 done, the checkpoint holds step 2
    assert (tmp_path / "b" / heal.CHECKPOINT).is_file()
    assert not list((tmp_path / "b").glob(".*tmp*"))
    got, resumed = run(tmp_path / "b")
    assert resumed.resumed_from == 2 and resumed.steps == 6
    assert resumed.losses == full.losses
    for n, v in want.items():
        assert torch.equal(got[n], v), n


def test_a_checkpoint_of_other_settings_is_refused(family_dir, tmp_path):
    teacher, student, facts, tok = compressed(family_dir("llama"))
    config = heal.HealConfig(steps=2, lr=1e-2, **{**FAST, "checkpoint_every": 1})
    heal.heal(student, teacher, facts, tok, config, checkpoints=tmp_path)
    teacher, student, facts, tok = compressed(family_dir("llama"))
    other = heal.HealConfig(steps=2, lr=2e-2, **{**FAST, "checkpoint_every": 1})
    with pytest.raises(SpectraInputError, match="other heal settings"):
        heal.heal(student, teacher, facts, tok, other, checkpoints=tmp_path)


def test_teacher_and_student_share_the_frozen_tensors(family_dir):
    teacher, student, facts, tok = compressed(family_dir("llama"))
    Trainable(student, facts)
    saved = heal.share_frozen(student, teacher)
    emb_s = student.get_input_embeddings().weight
    emb_t = teacher.get_input_embeddings().weight
    assert emb_s.data_ptr() == emb_t.data_ptr() and saved >= emb_t.numel() * 4


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_the_distillation_loss_equals_kl_div_and_its_gradient(temperature):
    g = torch.Generator().manual_seed(0)
    s = torch.randn(2, 7, 40, generator=g, requires_grad=True)
    q = torch.randn(2, 7, 40, generator=g)
    targets = torch.randint(0, 40, (2, 6), generator=g)
    loss, _ = heal.distill_loss(s, q, targets, temperature, lm_weight=0.3)
    t = temperature
    ref = F.kl_div(
        F.log_softmax(s.reshape(-1, 40) / t, -1),
        F.log_softmax(q.reshape(-1, 40) / t, -1),
        log_target=True,
        reduction="batchmean",
    ) * t * t + 0.3 * F.cross_entropy(s[:, :-1].reshape(-1, 40), targets.reshape(-1))
    torch.testing.assert_close(loss, ref)
    (got,) = torch.autograd.grad(loss, s)
    (want,) = torch.autograd.grad(ref, s)
    torch.testing.assert_close(got, want)


def test_the_schedule_warms_up_then_decays_to_zero():
    config = heal.HealConfig(steps=20, lr=1e-3, warmup=4)
    lrs = [config.lr_at(s) for s in range(20)]
    assert lrs[:4] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])
    assert lrs[4] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:], strict=False))
    assert lrs[-1] < 0.01 * 1e-3
    assert heal.HealConfig(steps=50).warmup == 5


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        ({"steps": 0}, "heal.steps=0"),
        ({"steps": -3}, "heal.steps=-3"),
        ({"lr": 0}, "heal.lr=0"),
        ({"lr": -1e-4}, "heal.lr=-0.0001"),
        ({"stepz": 5}, "unknown key 'stepz'"),
        ({"tokens_per_step": 1000, "seqlen": 512}, "multiple of"),
        ({"eval_tokens": 100}, "less than one window"),
        ("fast", "must be a mapping"),
        ({"ste": "yes"}, "heal.ste='yes'"),
    ],
)
def test_bad_heal_settings_name_the_key(raw, match):
    from spectra.plan import format as plans

    with pytest.raises(SpectraInputError, match=match):
        plans.parse({"rules": [], "heal": raw})


def test_a_plan_round_trips_its_heal_section():
    from spectra.plan import format as plans

    plan = plans.parse({"heal": {"steps": 7, "lr": 3e-4}})
    again = plans.parse(yaml.safe_load(plans.dumps(plan)))
    assert again.heal == plan.heal and again.heal.steps == 7 and again.heal.warmup == 0
    assert json.loads(plans.dumps(plan, "json"))["heal"]["lr"] == 3e-4


def test_a_trained_mpo_evaluates_its_live_cores_in_both_contraction_orders():
    """In training form (cores trainable, or seen through their grid) an MPO module
    computes W from its current cores, never from copies made when it was built."""
    from torch.nn.utils import parametrize

    from compressors.factors import quantize_factor
    from compressors.healing import _ThroughGrid
    from compressors.mpo import MPOLinear, dense

    g = torch.Generator().manual_seed(0)
    for shapes in ([(1, 4, 8, 6), (6, 8, 4, 1)], [(1, 8, 4, 6), (6, 4, 8, 1)]):
        cores = [torch.randn(*s, generator=g) for s in shapes]
        module = MPOLinear(cores)
        for c in module.cores:
            c.requires_grad_(True)
        old = quantize_factor(cores[0].detach().clone(), 4, 16)
        parametrize.register_parametrization(module.cores, "0", _ThroughGrid(old))
        with torch.no_grad():
            module.cores.parametrizations["0"].original.add_(0.5)  # a training step
            x = torch.randn(3, module.nf[0] * module.nf[1], generator=g)
            want = x @ dense(module.core_list()).T
            torch.testing.assert_close(module(x), want)
    assert {
        MPOLinear([torch.randn(*s) for s in sh]).reverse
        for sh in ([(1, 4, 8, 6), (6, 8, 4, 1)], [(1, 8, 4, 6), (6, 4, 8, 1)])
    } == {True, False}


def test_checkpointed_blocks_give_the_same_gradients(tiny_llama_dir):
    """The activation checkpointing heal uses on CUDA (tested here on the CPU)."""
    import torch

    from spectra.data.heal import checkpoint_blocks

    model = open_model(str(tiny_llama_dir), "cpu", "float32", "none").load()
    x = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    grads = []
    for ckpt in (False, True):
        model.zero_grad()
        with checkpoint_blocks(model) if ckpt else torch.enable_grad():
            model(x, use_cache=False).logits.square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert "forward" not in vars(model.model.layers[0])  # restored
    for n, g in grads[0].items():
        torch.testing.assert_close(grads[1][n], g)
