"""Fisher predictions against measured loss increases; the sensitivity cache."""

import pytest
import torch

NAMES = [
    f"model.layers.{b}.{r}"
    for b in (0, 14, 28)
    for r in ("self_attn.q_proj", "self_attn.o_proj", "mlp.down_proj")
]


@pytest.fixture()
def demo_model(demo_dir):
    from spectra.io import models

    return models.load(str(demo_dir), "cpu"), models.load_tokenizer(str(demo_dir))


@pytest.mark.demo
@pytest.mark.slow
def test_fisher_ranks_modules_like_the_measured_loss_increase(demo_model):
    """Spearman correlation between the Fisher-predicted and the measured loss increase
    of compressing one module at a time (lowrank keeping half its parameters), over 9
    modules spanning first, middle and last blocks and three roles. Threshold 0.7: with
    9 points a rank correlation that high has p < 0.05 under independence, and on this
    model the two agree at 0.92 with 2048 tokens each (0.7 leaves room for the smaller
    budget used here); a Fisher estimate carrying no information would fail it."""
    from scipy.stats import spearmanr

    from compressors.apply import linear_targets
    from compressors.registry import compress
    from spectra.plan import sensitivity as sens

    model, tok = demo_model
    cal = sens._windows(tok, sens.SensitivitySettings(tokens=1024, seqlen=256), "calib")
    ev = sens._windows(tok, sens.SensitivitySettings(kind="ppl", tokens=1024, seqlen=256), "eval")
    flags = [p.requires_grad for p in model.parameters()]
    fisher = sens.fisher(model, cal)
    assert [p.requires_grad for p in model.parameters()] == flags
    measured = sens.ppl_probe(model, ev, sens._lowrank_half, names=NAMES)
    targets = linear_targets(model)
    predicted = []
    for name in NAMES:
        w = targets[name][0].weight(targets[name][1]).detach().float()
        approx = compress(w, sens._lowrank_half(*w.shape)).to_dense().float()
        predicted.append(0.5 * float((fisher[name] * (w - approx) ** 2).sum()))
        assert fisher[name].shape == w.shape and bool((fisher[name] >= 0).all())
    rho = spearmanr(predicted, [measured[n]["delta_loss"] for n in NAMES]).statistic
    assert rho > 0.7, (rho, predicted, measured)


@pytest.mark.demo
def test_ppl_probe_restores_the_model_and_cache_round_trips(demo_model, demo_dir):
    from spectra.plan import sensitivity as sens

    model, _ = demo_model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    settings = sens.SensitivitySettings(kind="ppl", tokens=256, seqlen=128)
    info: dict = {}
    first = sens.compute(str(demo_dir), settings, model=model, info=info, names=NAMES[:2])
    assert info["cached"] is False and set(first) == set(NAMES[:2])
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    again = sens.compute(str(demo_dir), settings, model=model, info=info, names=NAMES[:2])
    assert info["cached"] is True and again == first
    # a garbage cache file is a miss, recomputed without error
    from pathlib import Path

    Path(info["path"]).write_text("{not json")
    third = sens.compute(str(demo_dir), settings, model=model, info=info, names=NAMES[:2])
    assert info["cached"] is False
    assert third.keys() == first.keys()
    for k in first:
        assert third[k]["delta_loss"] == pytest.approx(first[k]["delta_loss"], rel=1e-6)
