"""A method is its module: `halfrank`, defined in this file alone and registered with one
call, is planned, previewed, applied, healed, saved, reloaded (whole and a block at a
time) and exported by the library's own paths, with no other file touched. When this
test needs another file changed, the registry is missing a field."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
import yaml
from torch import nn

from compressors.base import DENSE_BITS, Factorization, check_rank, config_error
from compressors.method import Knob, Method
from compressors.registry import METHODS, PROBES, make_config, registered
from spectra.io.model import open_model
from spectra.plan import run

WHY_DENSE = "half-rank factors: no compressed-tensors format (written dense)"
TARGETS = r"re:model\.layers\.\d+\.mlp\.(gate|up|down)_proj"


@dataclass(frozen=True)
class HalfRankConfig:
    """Settings of `halfrank`: the top `rank` singular triplets, U S and V^T kept.

    Attributes:
        rank: kept rank (1..min(m, n)).
    """

    method: ClassVar[str] = "halfrank"
    rank: int = 4

    def __post_init__(self):
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 1:
            raise config_error(self.method, "rank", self.rank, "must be an integer >= 1")

    def check_shape(self, m: int, n: int) -> None:
        check_rank(self.method, self.rank, m, n)

    def cost(self, m: int, n: int) -> tuple[int, int]:
        return self.rank * (m + n), DENSE_BITS * self.rank * (m + n)


@dataclass
class HalfRank(Factorization):
    healable: ClassVar[bool] = True  # both factors train (the default `train`)
    a: torch.Tensor  # (m, r) = U S
    b: torch.Tensor  # (r, n) = V^T

    @property
    def shape(self):
        return (self.a.shape[0], self.b.shape[1])

    def to_dense(self):
        return self.a @ self.b

    @property
    def n_params(self):
        return self.a.numel() + self.b.numel()

    @property
    def bits(self):
        return DENSE_BITS * self.n_params

    def as_module(self, bias=None):
        return HalfRankLinear(self.a, self.b, bias)


class HalfRankLinear(nn.Module):
    """y = A (B x) + bias; A and B share their tensors with the factorization."""

    def __init__(self, a, b, bias=None):
        super().__init__()
        self.a = nn.Parameter(a, requires_grad=False)
        self.b = nn.Parameter(b, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def forward(self, x):
        z = nn.functional.linear(x, self.b.to(x.dtype))
        return nn.functional.linear(z, self.a.to(x.dtype), self.bias)


def compress(weight, config: HalfRankConfig, calib=None) -> HalfRank:
    config.check_shape(*weight.shape)
    u, s, vh = torch.linalg.svd(weight.detach().double(), full_matrices=False)
    r = config.rank
    a, b = (u[:, :r] * s[:r]).to(weight.dtype), vh[:r].to(weight.dtype)
    return HalfRank(a.contiguous(), b.contiguous())


TOY = Method(
    name="halfrank",
    config_cls=HalfRankConfig,
    compress=compress,
    summary="a test method: U S (m x r) and V^T (r x n) of the truncated SVD",
    paper="",
    data="never",
    knobs=(Knob("rank", "kept rank", 4, "int", 1),),
    columns=("rank",),
    defaults=lambda m, n: {"rank": max(1, min(m, n) // 2)},
    factorizations=(HalfRank,),
    probes={"halfrank-quarter": lambda m, n: HalfRankConfig(rank=max(1, min(m, n) // 4))},
    exports={"compressed-tensors": WHY_DENSE},
)


@pytest.fixture()
def toy():
    with registered(TOY) as method:
        yield method
    assert "halfrank" not in METHODS and "halfrank-quarter" not in PROBES


def _plan(rank: int):
    from spectra.plan import format as plans

    rules = [{"targets": [TARGETS], "method": "halfrank", "rank": rank}]
    return plans.parse({"version": 1, "calibration": {"samples": 4, "seqlen": 32}, "rules": rules})


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_registered_with_one_call_and_gone_after(toy):
    assert METHODS["halfrank"] is toy and "halfrank-quarter" in PROBES
    assert make_config("halfrank", rank=3) == HalfRankConfig(rank=3)
    with pytest.raises(ValueError, match="already registered"):
        from compressors.registry import register

        register(Method(**{**TOY.__dict__, "summary": "another"}))


def test_planned_previewed_applied_healed_saved_reloaded_and_exported(toy, family_dir, tmp_path):
    from compressors import io, streamed_out
    from compressors.apply import asdict
    from spectra.data import heal
    from spectra.data import perplexity as ev
    from spectra.export import ctensors, export
    from spectra.plan import format as plans
    from spectra.preview import Previewer, module_errors

    spec = str(family_dir("llama"))
    model, tok = open_model(spec, "cpu", "float32", "none").load(), open_model(spec).tokenizer()
    plan = _plan(rank=4)
    text = plans.dumps(plan)
    assert plans.to_dict(plans.parse(yaml.safe_load(text))) == plans.to_dict(plan)

    # planned: every MLP matrix, costed by the toy's own config, each alone
    from compressors.apply import linear_targets

    targets = [t for t, _ in linear_targets(model).values()]
    entries = [e for e in plans.resolve(plan, targets) if e.config is not None]
    assert len(entries) == 6 and {e.group for e in entries} == {None}
    assert all(e.params_after == 4 * sum(e.shape) < e.params_before for e in entries)

    # previewed: the error falls as the rank rises; the perplexity preview runs it
    w = model.get_submodule(entries[0].name).weight.detach()
    errs = [module_errors(w, HalfRankConfig(rank=r))[0] for r in (2, 8, 32, 64)]
    assert errs == sorted(errs, reverse=True) and errs[0] > 0.5 and errs[-1] < 1e-5
    layers = {e.name: e.config for e in entries}
    pv = Previewer(model, tok, seqlen=32)
    got = pv.preview(layers, 256)
    assert got.recompressed == 6 and math.isfinite(got.ppl) and got.ppl != got.dense_ppl

    # applied as `spectra apply` does
    student, reports, facts = run.apply_plan(model, plan)
    assert {r.method for r in reports} == {"halfrank"} and len(facts) == 6
    assert all(isinstance(student.get_submodule(n), HalfRankLinear) for n in facts)
    ids = torch.randint(0, 300, (2, 16))
    torch.testing.assert_close(_logits(student, ids), got_logits := _logits(student, ids))
    assert not torch.allclose(got_logits, _logits(model, ids))

    # healed: its factors train, the loss does not blow up
    before = {n: f.a.clone() for n, f in facts.items()}
    fast = dict(tokens_per_step=64, seqlen=32, eval_every=0, eval_tokens=64, checkpoint_every=0)
    facts, result = heal.heal(student, model, facts, tok, heal.HealConfig(steps=3, lr=1e-2, **fast))
    assert result.steps == 3 and all(math.isfinite(x) for x in result.losses)
    assert result.losses[-1] < 2 * result.losses[0]
    assert all(not torch.equal(facts[n].a, before[n]) for n in facts)
    assert all(isinstance(student.get_submodule(n), HalfRankLinear) for n in facts)
    healed = _logits(student, ids)

    # saved and reloaded: whole, and a block at a time
    out = tmp_path / "out"
    io.save(out, student, facts, text, {"modules": [asdict(r) for r in reports]}, tok)
    again, again_facts = io.load(out)
    assert {type(f) for f in again_facts.values()} == {HalfRank}
    torch.testing.assert_close(_logits(again, ids), healed, rtol=1e-5, atol=1e-5)
    streamed = streamed_out.load(out)
    whole = ev.window_nll(again, ids)
    torch.testing.assert_close(ev.stream_nll(streamed, [ids])[0], whole, rtol=1e-5, atol=1e-6)

    # exported: hf is the dense reconstruction (resident and streamed alike); the
    # compressed-tensors export gives the method's own reason for writing it dense
    from transformers import AutoModelForCausalLM

    from compressors.opened import open_out

    for offload in ("none", "disk"):
        dest = tmp_path / f"hf-{offload}"
        summary = export(open_out(out, "cpu", offload=offload), "hf", dest, dtype="float32")
        assert [r["stored"] for r in summary["modules"]] == ["dense"] * 6
        dense = AutoModelForCausalLM.from_pretrained(dest).eval()
        torch.testing.assert_close(_logits(dense, ids), healed, rtol=1e-4, atol=1e-4)
    assert ctensors.container(again_facts[entries[0].name]) == (None, WHY_DENSE)
