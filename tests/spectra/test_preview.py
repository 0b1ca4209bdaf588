"""Incremental previews agree with a full recomputation and with apply + eval."""

import pytest

from compressors.registry import make_config
from spectra.errors import SpectraInputError
from spectra.io.model import open_model
from spectra.plan import run


@pytest.fixture()
def demo(demo_dir):

    return open_model(str(demo_dir), "cpu", "float32", "none").load(), open_model(
        str(demo_dir)
    ).tokenizer()


@pytest.mark.demo
def test_replayed_blocks_give_the_full_result_and_reverts_reuse_modules(demo):
    from spectra.data import perplexity as ev
    from spectra.plan import format as plans
    from spectra.plan import run
    from spectra.preview import Previewer

    model, tok = demo
    one = {"model.layers.2.mlp.up_proj": make_config("lowrank", rank=48)}
    two = {**one, "model.layers.20.self_attn.o_proj": make_config("quant", bits=3)}
    pv = Previewer(model, tok)
    first = pv.preview(one, 1024)
    assert first.recompressed == 1 and first.first_block == 2
    second = pv.preview(two, 1024)
    assert second.changed == ["model.layers.20.self_attn.o_proj"]
    assert second.recompressed == 1 and second.first_block == 20
    full = Previewer(model, tok).preview(two, 1024)  # nothing replayed
    assert second.ppl == pytest.approx(full.ppl, rel=1e-6)
    back = pv.preview(one, 1024)  # the o_proj goes back to dense: no compression
    assert back.recompressed == 0 and back.ppl == pytest.approx(first.ppl, rel=1e-6)
    # and the convention is spectra eval's on the applied plan
    plan = plans.parse({"layers": {k: {"method": c.method, **c.__dict__} for k, c in two.items()}})
    compressed, _, _ = run.apply_plan(model, plan)
    ref = ev.perplexity(compressed, tok, max_tokens=1024)
    assert ref.ppl == pytest.approx(second.ppl, rel=1e-5)
    # a joint group, then one member leaves it: the rest is rebuilt as apply builds it
    attn = "model.layers.5.self_attn."
    group = {**one, **{attn + r: make_config("joint", rank=40) for r in ("q_proj", "k_proj")}}
    pv.preview(group, 1024)
    smaller = {**one, attn + "q_proj": make_config("joint", rank=40)}
    after = pv.preview(smaller, 1024)
    assert after.changed == [attn + "k_proj"]
    assert after.ppl == pytest.approx(Previewer(model, tok).preview(smaller, 1024).ppl, rel=1e-6)
    assert first.dense_ppl == pytest.approx(
        ev.perplexity(model, tok, max_tokens=1024).ppl, rel=1e-6
    )


def test_module_error_from_the_spectrum_equals_the_compression():
    import torch

    from compressors.base import relative_error
    from compressors.registry import compress
    from spectra.preview import module_error

    w = torch.randn(40, 30, generator=torch.Generator().manual_seed(0))
    for config in (
        make_config("lowrank", rank=7),
        make_config("quant", bits=3),
        make_config("prune", sparsity=0.6),
        make_config("mpo", bond_dim=4),
    ):
        want = float(relative_error(w, compress(w, config).to_dense()))
        assert module_error(w, config) == pytest.approx(want, rel=1e-5)
    sigma = torch.linalg.svdvals(w.double()).numpy()
    assert module_error(None, make_config("lowrank", rank=7), sigma) == pytest.approx(
        float(relative_error(w, compress(w, make_config("lowrank", rank=7)).to_dense())),
        rel=1e-5,
    )


class Cancel(Exception):
    pass


def test_progress_by_block_and_a_cancelled_preview_leaves_it_consistent(family_dir):
    """Progress counts compressions and block runs; a cancel at any point (here during
    the compressions, then during the blocks) leaves the next preview exact."""
    from spectra.preview import Previewer

    path = str(family_dir("llama"))
    model, tok = open_model(path, "cpu", "float32", "none").load(), open_model(path).tokenizer()
    one = {"model.layers.1.mlp.up_proj": make_config("lowrank", rank=8)}
    two = {
        "model.layers.0.mlp.up_proj": make_config("lowrank", rank=4),
        "model.layers.1.mlp.down_proj": make_config("quant", bits=3),
    }
    seen = []
    pv = Previewer(model, tok, seqlen=32)
    pv.preview(one, 256, progress=lambda d, t, w: seen.append((d, t, w)))
    blocks = [x for x in seen if "block" in x[2]]
    assert blocks[-1][0] == blocks[-1][1]  # every block run counted, 2 blocks x 2 batches
    assert any("compressing model.layers.1.mlp.up_proj" in w for _, _, w in seen)
    for stop_at in ("compressing", "block"):

        def cancel(d, t, what, stop_at=stop_at):
            if stop_at in what and d >= 1:
                raise Cancel

        with pytest.raises(Cancel):
            pv.preview(two, 256, progress=cancel)
        again = pv.preview(two, 256)
        assert again.ppl == pytest.approx(Previewer(model, tok, seqlen=32).preview(two, 256).ppl)
        pv.preview(one, 256)


CALIBRATED = {
    "model.layers.0.mlp.down_proj": make_config("lowrank", rank=12, whiten=True),
    "model.layers.1.self_attn.o_proj": make_config("quant", bits=3, group_size=16, gptq=True),
    "model.layers.1.mlp.up_proj": make_config("prune", sparsity=0.5, wanda=True),
    "model.layers.0.self_attn.q_proj": make_config("joint", rank=8, whiten=True),
    "model.layers.0.self_attn.k_proj": make_config("joint", rank=8, whiten=True),
    "model.layers.1.mlp.gate_proj": make_config("mpo", cores=2, bond_dim=6, whiten=True),
}


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_data_aware_settings_preview_as_apply_and_eval_score_them(family, family_dir):
    from compressors.apply import linear_targets
    from spectra.data import calibration
    from spectra.data import perplexity as ev
    from spectra.plan import format as plans
    from spectra.preview import Previewer

    path = str(family_dir(family))
    model, tok = open_model(path, "cpu", "float32", "none").load(), open_model(path).tokenizer()
    names = list(linear_targets(model))
    layers = (
        dict(zip(names[:6], CALIBRATED.values(), strict=True)) if family == "gpt2" else CALIBRATED
    )
    if family == "gpt2":  # no joint siblings there: each stands alone
        layers = {k: v for k, v in layers.items() if v.method != "joint"}
    grams = calibration.calibrate(
        open_model(path), calibration.CalibrationSpec(samples=4, seqlen=32)
    )
    pv = Previewer(model, tok, seqlen=32)
    with pytest.raises(SpectraInputError, match="no calibration"):
        pv.preview(layers, 128)
    pv.use_calibration(grams)
    got = pv.preview(layers, 128)
    plan = plans.parse(
        {"layers": {k: {"method": c.method, **c.__dict__} for k, c in layers.items()}}
    )
    compressed, reports, _ = run.apply_plan(model, plan, grams)
    ref = ev.perplexity(compressed, tok, seqlen=32, max_tokens=128)
    assert got.ppl == pytest.approx(ref.ppl, rel=1e-5) and got.ppl != pytest.approx(got.dense_ppl)
    assert all(r.calib_error is not None for r in reports)


def test_errors_of_whitened_low_rank_at_every_rank_from_one_svd():
    import torch

    from compressors.base import Calibration, h_norm
    from compressors.lowrank import curves as whitened_curves
    from compressors.registry import compress
    from spectra.preview import module_errors

    g = torch.Generator().manual_seed(3)
    x = torch.randn(200, 20, generator=g, dtype=torch.float64) * torch.logspace(-1, 1, 20)
    w = torch.randn(16, 20, generator=g, dtype=torch.float64)
    calib = Calibration.from_activations(x)
    curves = whitened_curves(w, calib.hessian)
    for k in range(1, 17):
        config = make_config("lowrank", rank=k, whiten=True)
        w_k = compress(w, config, calib).to_dense()
        want_w = float(torch.linalg.norm(w - w_k) / torch.linalg.norm(w))
        want_h = h_norm(w - w_k, calib.hessian) / h_norm(w, calib.hessian)
        assert curves[0][k] == pytest.approx(want_w, rel=1e-6, abs=1e-9)
        assert curves[1][k] == pytest.approx(want_h, rel=1e-6, abs=1e-9)
        fast = module_errors(w, config, calib=calib, curves=curves)
        slow = module_errors(w, config, calib=calib)
        assert fast == pytest.approx(slow, rel=1e-5, abs=1e-6)  # slow: float32 W
    # a data-free setting gets its calibration-weighted error too
    plain = make_config("quant", bits=3, group_size=4)
    w_q = compress(w, plain).to_dense()
    assert module_errors(w, plain, calib=calib)[1] == pytest.approx(
        h_norm(w - w_q, calib.hessian) / h_norm(w, calib.hessian), rel=1e-6
    )


@pytest.mark.parametrize("shape", [(16, 20), (20, 20), (60, 12)])
def test_errors_of_plain_low_rank_under_a_calibration_at_every_rank(shape):
    """Plain low rank's calibration-weighted error at every rank from one
    factorization of W (the app's row edits), checked against each rank's compression:
    wide, square and tall (a head, through W^T W)."""
    import torch

    from compressors.base import Calibration, h_norm
    from compressors.lowrank import curves
    from compressors.registry import compress
    from spectra.preview import module_errors

    g = torch.Generator().manual_seed(4)
    m, n = shape
    x = torch.randn(300, n, generator=g, dtype=torch.float64) * torch.logspace(-1, 1, n)
    w = torch.randn(m, n, generator=g, dtype=torch.float64) * torch.logspace(0, -1, n)
    calib = Calibration.from_activations(x)
    got = curves(w.numpy(), calib.hessian.numpy(), whiten=False)
    for k in range(1, min(m, n) + 1):
        config = make_config("lowrank", rank=k)
        w_k = compress(w, config).to_dense()
        want_w = float(torch.linalg.norm(w - w_k) / torch.linalg.norm(w))
        want_h = h_norm(w - w_k, calib.hessian) / h_norm(w, calib.hessian)
        assert got[0][k] == pytest.approx(want_w, rel=1e-6, abs=1e-7)
        assert got[1][k] == pytest.approx(want_h, rel=1e-6, abs=1e-7)
        fast = module_errors(w, config, calib=calib, curves=got)
        assert fast == pytest.approx(module_errors(w, config, calib=calib), rel=1e-5, abs=1e-6)
    assert got[1][0] == pytest.approx(1.0) and got[1][min(m, n)] == 0.0


def test_pending_names_what_each_preview_runs(family_dir):
    """Previewer.pending (the app's time left over every phase) predicts the dense
    baseline's blocks, the compressions and the blocks each preview then runs."""
    from collections import Counter

    from spectra.preview import Previewer

    path = str(family_dir("llama"))
    pv = Previewer(
        open_model(path, "cpu", "float32", "none").load(), open_model(path).tokenizer(), seqlen=64
    )
    b0 = {"model.layers.0.mlp.up_proj": make_config("lowrank", rank=4)}
    b1 = {**b0, "model.layers.1.self_attn.o_proj": make_config("quant", bits=3)}
    steps = [(b0, 512), (b1, 512), (b1, 512), (b0, 512), (b1, 1024)]
    for layers, tokens in steps:
        plan = pv.pending(layers, tokens)
        seen = Counter()

        def progress(done, total, what, seen=seen):
            seen[what.split(" ")[0].rstrip(",")] += 1

        r = pv.preview(layers, tokens, progress=progress)
        ran = {"dense": seen["dense"], "compressing": r.recompressed, "block": seen["block"]}
        assert plan == ran, (layers, tokens)
    assert [pv.history[i].first_block for i in (1, 2, 3)] == [1, None, 1]


def test_the_time_left_counts_the_phases_to_come():
    from app.views import progress

    class Bar:  # what st.progress shows
        text = ""

        def progress(self, value, text):
            self.text = text

    progress.RATES.clear()
    bar = Bar()
    eta = progress.Eta(bar, plan={"dense": 2, "compressing": 1, "block": 2})
    eta(1, 2, "dense baseline, block 1/2")
    assert "s left" not in bar.text  # no rate yet
    eta.start -= 10  # the first baseline block took 10 s
    eta(2, 2, "dense baseline, block 2/2")
    # 5 s a block: the 2 blocks after the compression take 10 s, the compression unknown
    assert "about 10 s left then 1 compression" in bar.text, bar.text
    eta(0, 1, "compressing model.layers.1.mlp.up_proj")
    assert bar.text.endswith("(0/1, over 10 s left)"), bar.text
    eta.start -= 4
    eta(1, 1, "compressing model.layers.1.mlp.up_proj")
    assert bar.text.endswith("(1/1, about 10 s left)"), bar.text
    eta(1, 2, "block 1/2")
    assert "about 5 s left" in bar.text, bar.text


def test_auto_allocate_time_left_spans_its_steps():
    """Auto-allocate's steps (calibration, ranking, building) under one time left: the
    steps to come are named until they have run once, then counted at their rates."""
    from app.views import progress

    class Bar:
        text = ""

        def progress(self, value, text):
            self.text = text

    steps = {"block": 2, "candidates": 3, "compressing": 3}
    labels = {"block": "calibration", "candidates": "ranking"}
    progress.RATES.clear()
    bar = Bar()
    eta = progress.Eta(bar, "auto-allocate", plan=steps, labels=labels)
    eta(1, 2, "block 0")
    assert bar.text == "Auto-allocate: calibration block 0 (1/2, then 3 candidates, 3 compressions)"
    eta.start -= 10
    eta(1, 2, "block 0")
    assert "about 10 s left then 3 candidates, 3 compressions" in bar.text, bar.text
    eta(2, 2, "block 1")
    eta(1, 3, "candidates model.layers.0.q_proj")
    assert "ranking candidates" in bar.text and "then 3 compressions" in bar.text, bar.text
    eta.start -= 2
    eta(1, 3, "candidates model.layers.0.q_proj")
    eta(3, 3, "candidates lm_head")
    eta.expect("compressing", 1)  # the allocation compresses one module
    eta(0, 1, "compressing model.layers.0.q_proj")
    eta.start -= 3
    eta(1, 1, "compressing model.layers.0.q_proj")
    # a second Auto-allocate in the process: every step counted from the start
    again = progress.Eta(bar, "auto-allocate", plan=steps, labels=labels)
    again(0, 2, "block 0")
    # 2 blocks at 5 s + 3 candidates at 2/3 s + 3 compressions at 3 s
    assert bar.text.endswith("(0/2, about 21 s left)"), bar.text
    # an allocation read from the store skips the ranking: building follows calibration
    again(2, 2, "block 1")
    again(0, 3, "compressing model.layers.0.q_proj")
    assert "candidates" not in again.ahead and bar.text.endswith("about 9 s left)"), bar.text


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_width_blocks_preview_as_apply_and_eval_score_them(family, family_dir):
    """Block entries of `width` (narrowed MLPs, merged key/value heads, a removed
    attention) with module methods on what width leaves (GPTQ on the narrowed
    down_proj, low rank on an up_proj) preview to the perplexity `spectra apply` + eval
    give; dropping one block's width reruns from that block only, and the plan without
    width is the dense model again."""
    from spectra.data import calibration
    from spectra.data import perplexity as ev
    from spectra.plan import format as plans
    from spectra.preview import Previewer

    path = str(family_dir(family))
    model, tok = open_model(path, "cpu", "float32", "none").load(), open_model(path).tokenizer()
    grams = calibration.calibrate(
        open_model(path), calibration.CalibrationSpec(samples=4, seqlen=32)
    )
    layers = {
        "model.layers.0": make_config("width", ffn=40, kv_heads=1),
        "model.layers.0.mlp.down_proj": make_config("quant", bits=4, gptq=True),
        "model.layers.1": make_config("width", ffn=32, select="norm", skip="attention"),
        "model.layers.1.mlp.up_proj": make_config("lowrank", rank=8),
    }
    pv = Previewer(model, tok, seqlen=32, grams=grams)
    got = pv.preview(layers, 128)
    assert got.first_block == 0 and got.recompressed == 2
    plan = plans.parse(
        {"layers": {k: {"method": c.method, **c.__dict__} for k, c in layers.items()}}
    )
    compressed, _, _ = run.apply_plan(model, plan, grams)
    ref = ev.perplexity(compressed, tok, seqlen=32, max_tokens=128)
    assert got.ppl == pytest.approx(ref.ppl, rel=1e-5) and got.ppl != pytest.approx(got.dense_ppl)
    fewer = {k: v for k, v in layers.items() if not k.startswith("model.layers.1")}
    one = pv.preview(fewer, 128)
    assert one.first_block == 1 and one.recompressed == 0
    plan = plans.parse(
        {"layers": {k: {"method": c.method, **c.__dict__} for k, c in fewer.items()}}
    )
    ref = ev.perplexity(run.apply_plan(model, plan, grams)[0], tok, seqlen=32, max_tokens=128)
    assert one.ppl == pytest.approx(ref.ppl, rel=1e-5)
    assert pv.preview({}, 128).ppl == pytest.approx(got.dense_ppl, rel=1e-6)
    back = pv.preview(layers, 128)  # both narrowed blocks kept: nothing rebuilt
    assert back.recompressed == 0 and back.ppl == pytest.approx(got.ppl, rel=1e-6)
    unknown = {**layers, "model.layers.0.mlp.nope_proj": make_config("lowrank", rank=4)}
    with pytest.raises(SpectraInputError, match="nope_proj"):  # one clear line, not a KeyError
        pv.preview(unknown, 128)
