"""`Previewer.prebuild` (issue 32): what Auto-allocate compresses up front, the first
preview only evaluates, with the same perplexity."""

import pytest

from compressors.registry import make_config
from spectra.io.model import open_model

LAYERS = {
    "model.layers.0.mlp.down_proj": make_config("lowrank", rank=12, whiten=True),
    "model.layers.0.self_attn.q_proj": make_config("joint", rank=8),
    "model.layers.0.self_attn.k_proj": make_config("joint", rank=8),
    "model.layers.1.mlp.up_proj": make_config("lowrank", rank=8),
}


def test_a_prebuilt_plan_previews_without_compressing(family_dir):
    from spectra.data import calibration
    from spectra.preview import Previewer

    path = str(family_dir("llama"))
    model, tok = open_model(path, "cpu", "float32", "none").load(), open_model(path).tokenizer()
    grams = calibration.calibrate(
        open_model(path), calibration.CalibrationSpec(samples=4, seqlen=32)
    )
    pv = Previewer(model, tok, seqlen=32, grams=grams)
    heard = []
    assert pv.prebuild(LAYERS, progress=lambda *a: heard.append(a)) == 3  # joint: one unit
    assert [d for d, _, _ in heard] == [1, 2, 3] and heard[-1][1] == 3
    assert pv.prebuild(LAYERS) == 0  # already in the store
    got = pv.preview(LAYERS, 128)
    assert got.recompressed == 0
    ref = Previewer(model, tok, seqlen=32, grams=grams).preview(LAYERS, 128)
    assert ref.recompressed == 3 and got.ppl == pytest.approx(ref.ppl, rel=1e-6)


@pytest.mark.parametrize("serial", [True, False])
def test_big_matrices_are_compressed_one_at_a_time(family_dir, monkeypatch, serial):
    """Matrices of SERIAL_NUMEL elements or more (an 8B q_proj) are compressed alone,
    two of them at once would hold two sets of working matrices; smaller ones go one per
    core. The store is the same either way."""
    import os
    import threading
    import time

    from spectra.linalg import parallel
    from spectra.preview import Previewer

    if (os.cpu_count() or 1) < 2:
        pytest.skip("one core: never two at once")
    path = str(family_dir("llama"))
    model, tok = open_model(path, "cpu", "float32", "none").load(), open_model(path).tokenizer()
    monkeypatch.setattr(parallel, "SERIAL_NUMEL", 1 if serial else 1 << 40)
    pv = Previewer(model, tok, seqlen=32)
    names = [f"model.layers.{b}.mlp.{m}_proj" for b in (0, 1) for m in ("up", "down")]
    layers = {n: make_config("lowrank", rank=8) for n in names}
    running, most = [0], [0]
    lock = threading.Lock()
    build = pv._build

    def counted(*a):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.2)  # long enough for a second worker to start beside it
        try:
            return build(*a)
        finally:
            with lock:
                running[0] -= 1

    monkeypatch.setattr(pv, "_build", counted)
    assert pv.prebuild(layers) == 4
    assert most[0] == (1 if serial else 2)
    assert len(pv.built) == 4


def test_apply_runs_big_factorizations_one_at_a_time(monkeypatch):
    """`spectra apply`'s default mapper: the factorizations in order, those of weights
    of SERIAL_NUMEL elements or more alone (after the small ones, which go one per
    core)."""
    import threading
    import time

    import torch

    from compressors.apply import _local_map, _Work
    from spectra.linalg import parallel

    monkeypatch.setattr(parallel, "SERIAL_NUMEL", 100)
    sizes = [(8, 8), (20, 10), (4, 4), (10, 30), (2, 2)]  # 200 and 300 elements: alone
    work = [_Work(str(i), None, [torch.zeros(s)], None) for i, s in enumerate(sizes)]
    running, log = [0], []
    lock = threading.Lock()

    def fn(w):
        with lock:
            running[0] += 1
            log.append((w.name, running[0]))
        time.sleep(0.1)
        with lock:
            running[0] -= 1
        return w.name

    assert _local_map(fn, work) == ["0", "1", "2", "3", "4"]
    assert [n for n, _ in log][-2:] == ["1", "3"]  # the big ones last
    assert all(k == 1 for n, k in log if n in ("1", "3"))


def test_the_previewer_widens_one_module_h_at_a_time(family_dir):
    """A block's Grams stay as the calibration stores them (float32): only the H a
    compression reads is widened to float64 (a whole block of 8B shapes in float64 held
    2 GB more), and the preview checks a calibration's presence without widening any."""
    import torch

    from spectra.data import calibration
    from spectra.preview import Previewer

    path = str(family_dir("llama"))
    model, tok = open_model(path, "cpu", "float32", "none").load(), open_model(path).tokenizer()
    grams = calibration.calibrate(
        open_model(path), calibration.CalibrationSpec(samples=4, seqlen=32)
    )
    pv = Previewer(model, tok, seqlen=32, grams=grams)
    name = "model.layers.0.mlp.down_proj"
    stored = grams[0][name][0]
    assert stored.dtype == torch.float32
    widened = []
    real = torch.Tensor.to

    def spy(t, *a, **k):
        out = real(t, *a, **k)
        if out.dtype == torch.float64 and t.dim() == 2 and t.shape[0] == t.shape[1]:
            widened.append(tuple(t.shape))
        return out

    torch.Tensor.to = spy
    try:
        pv._units({name: make_config("lowrank", rank=4, whiten=True)})
        assert widened == []  # presence only
        calib = pv.calibration(name)
    finally:
        torch.Tensor.to = real
    assert widened == [tuple(stored.shape)]
    assert calib.hessian.dtype == torch.float64 and torch.equal(calib.hessian, stored.double())
    assert all(h.dtype == torch.float32 for b in pv._blocks.values() for h, _ in b.values())
