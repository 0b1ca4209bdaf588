"""Sequential calibration: each block's H from the outputs of the blocks before it as
already compressed (GPTQ's and SparseGPT's reference scheme)."""

import copy

import pytest
import torch

from compressors import activations
from compressors import apply as applying
from spectra.plan import format as plans
from spectra.plan import run

PLAN = {
    "rules": [
        {
            "targets": [r"re:.*\.(mlp|self_attn)\..*"],
            "method": "quant",
            "bits": 3,
            "group_size": 16,
            "gptq": True,
        },
    ],
    "layers": {
        "model.layers.0.mlp.down_proj": {"method": "lowrank", "rank": 6, "whiten": True},
        # last: the reference deep-copies the partly compressed model, and sparse
        # tensors cannot be deep-copied
        "model.layers.1.mlp.down_proj": {"method": "prune", "sparsity": 0.5, "sparsegpt": True},
    },
}


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()


def calib_ids(n=6, seqlen=16):
    return torch.randint(0, 128, (n, seqlen), generator=torch.Generator().manual_seed(0))


def reconstructed(facts):
    return {n: f.to_dense().float() for n, f in facts.items()}


def test_sequential_equals_block_by_block_recalibration(tiny):
    """Reference: compress block 0 on the dense model's Grams, then recollect all Grams
    from that partly compressed model (an ordinary dense-style pass) for block 1."""
    plan = plans.parse(PLAN)
    ids = calib_ids()
    seen = {}
    _, _, facts = run.apply_plan(
        tiny, plan, calib_ids=ids, on_grams=lambda b, g: seen.setdefault(b, g)
    )
    targets = applying.linear_targets(tiny)
    entries = plans.resolve(plan, [t for t, _ in targets.values()], run.weight_ranks(targets))
    step = copy.deepcopy(tiny)
    want = {}
    for block in (0, 1):
        grams = activations.collect(step, ids)
        for name, (h, rows) in grams[block].items():
            torch.testing.assert_close(seen[block][name][0], h, rtol=1e-6, atol=1e-6)
            assert seen[block][name][1] == rows
        these = [e for e in entries if e.block == block]
        step, _, f = applying.apply(step, these, grams={block: grams[block]})
        want.update(f)
        # the next block reads the compressed block's outputs: the forward of its
        # reconstructed weights (as sequential apply propagates)
        for name, fact in f.items():
            w = fact.to_dense().float()
            dense = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
            dense.weight.data = w
            parent, _, leaf = name.rpartition(".")
            setattr(step.get_submodule(parent), leaf, dense)
    got, ref = reconstructed(facts), reconstructed(want)
    assert set(got) == set(ref) and len(got) == 14
    for name in got:
        torch.testing.assert_close(got[name], ref[name], rtol=0, atol=0)


def test_block_zero_is_the_dense_calibration_and_later_blocks_differ(tiny):
    plan = plans.parse(PLAN)
    ids = calib_ids()
    dense = activations.collect(tiny, ids)
    _, _, seq = run.apply_plan(tiny, plan, calib_ids=ids)
    _, _, den = run.apply_plan(tiny, plan, grams=dense)
    for name, f in seq.items():
        same = torch.equal(f.to_dense(), den[name].to_dense())
        assert same == (".layers.0." in name), name


def test_the_source_model_is_untouched(tiny):
    before = {k: v.clone() for k, v in tiny.state_dict().items()}
    run.apply_plan(tiny, plans.parse(PLAN), calib_ids=calib_ids())
    after = tiny.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_the_result_holds_the_compact_modules_not_the_stand_ins(tiny):
    """Blocks are propagated through dense stand-ins, but the model handed back holds
    the compact modules, whose forward equals the reconstructed weights'."""
    from compressors.quant import QuantLinear
    from compressors.sparse import SparseLinear

    model, _, facts = run.apply_plan(tiny, plans.parse(PLAN), calib_ids=calib_ids())
    mods = dict(model.named_modules())
    assert isinstance(mods["model.layers.0.self_attn.q_proj"], QuantLinear)
    assert isinstance(mods["model.layers.1.mlp.down_proj"], SparseLinear)
    assert not any(type(mods[n]) is torch.nn.Linear for n in facts)
    x = torch.randn(3, tiny.config.hidden_size)
    q = mods["model.layers.1.self_attn.q_proj"]
    want = x @ facts["model.layers.1.self_attn.q_proj"].to_dense().float().T
    torch.testing.assert_close(q(x), want, rtol=1e-5, atol=1e-5)
