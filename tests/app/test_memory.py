"""Issue 43, memory bounded: each heavy action says before it starts when it would not
fit (with the figure), and Auto-allocate's compressions for the previews run in the
background, where a new allocation stops them (AppTest and the library, no browser)."""

import re
import tempfile
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from spectra.io.model import open_model


def plan_page() -> AppTest:
    path = Path(tempfile.gettempdir()) / "spectra_app_memory_plan.py"
    path.write_text("from app.views import plan_page\nplan_page.render()\n")
    return AppTest.from_file(str(path), default_timeout=300).run()


def test_gram_block_is_the_calibrations_own_block_in_float64(family_dir):
    """The estimate's largest block of Grams, from headers alone, is what a calibration
    stores per block (spectra.data.grams.entry_bytes, from the loaded modules), in
    float64 instead of float32."""
    from app import memory
    from spectra.data.grams import entry_bytes

    model = open_model(str(family_dir("llama")), "cpu", "float32", "none")
    blocks = memory.blocks(model)
    assert blocks == model.config["num_hidden_layers"]
    assert memory.gram_block(model) * blocks == entry_bytes(model.load()) * 2


def test_an_action_that_would_not_fit_is_refused_in_the_page_before_it_starts(
    family_dir, monkeypatch, tmp_path
):
    """Free memory made tiny: Auto-allocate shows one line with the figure and starts
    nothing (no calibration written, no plan, no build); with the memory back, it runs."""
    from app import memory

    monkeypatch.setenv("SPECTRA_APP_MODEL", str(family_dir("llama")))
    monkeypatch.setenv("SPECTRA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(memory, "free_bytes", lambda device: 10_000)
    at = plan_page()
    at.button(key="auto_go").click().run()
    assert not at.exception, at.exception
    errors = [e.value for e in at.error]
    assert len(errors) == 1 and errors[0].startswith("Auto-allocate needs about "), errors
    assert re.search(r"needs about [\d.]+ [MG]B \(the model as run [\d.]+ [MG]B, ", errors[0])
    assert re.search(r"\) and [\d.]+ MB is available: free memory", errors[0])
    assert not at.session_state.plan_layers
    assert not (tmp_path / "cache" / "calibration").exists()
    monkeypatch.undo()
    monkeypatch.setenv("SPECTRA_APP_MODEL", str(family_dir("llama")))
    monkeypatch.setenv("SPECTRA_CACHE", str(tmp_path / "cache"))
    at.button(key="auto_go").click().run()
    assert not at.error and at.session_state.plan_layers


def test_a_preview_too_big_is_refused_with_the_plans_modules_counted(family_dir, monkeypatch):
    from app import memory

    model = open_model(str(family_dir("llama")), "cpu", "float32", "none")
    small = sum(memory.need(model, "preview", 2048, 0).values())
    big = memory.need(model, "preview", 2048, 10**9)
    assert big["the plan's compressed modules"] == 4e9  # in the working dtype, float32
    half = memory.need(model.with_run(dtype="bfloat16"), "preview", 2048, 10**9)
    assert half["the plan's compressed modules"] == 2e9
    monkeypatch.setattr(memory, "free_bytes", lambda device: int(small) + 1)
    memory.check(model, "preview", 2048, 0)  # fits
    with pytest.raises(Exception, match=r"Preview needs about 4\.\d GB"):
        memory.check(model, "preview", 2048, 10**9)


def test_a_stopped_build_keeps_what_it_built_and_the_preview_builds_the_rest(family_dir):
    """Stopped before it starts, the build ends after the modules already in flight (one
    more than the cores, at most); the next preview compresses only the rest and scores
    what a fresh previewer scores."""
    from app.views.plan_build import Build
    from compressors.apply import linear_targets
    from compressors.registry import make_config
    from spectra.preview import Previewer

    path = family_dir("llama")
    model = open_model(str(path), "cpu", "float32", "none")
    names = [t.name for t, _ in linear_targets(model.load()).values() if t.block is not None]
    layers = {n: make_config("lowrank", rank=4) for n in names}
    pv = Previewer(model.load(), model.tokenizer(), seqlen=64)
    build = Build(pv, layers)
    assert build.total == len(names) > 4
    build._stop.set()
    build.start().thread.join(60)
    assert not build.running and build.error is None
    kept = len(pv.built)
    assert 1 <= kept <= 3
    got = pv.preview(layers, 256)
    assert got.recompressed == len(names) - kept
    fresh = Previewer(model.load(), model.tokenizer(), seqlen=64).preview(layers, 256)
    assert got.ppl == pytest.approx(fresh.ppl, rel=1e-6)


def test_auto_allocate_returns_with_the_build_in_the_background(family_dir, monkeypatch):
    """Auto-allocate ends with the plan; the build of its modules is the page's, and a
    preview right after waits for it (nothing compressed twice)."""
    monkeypatch.setenv("SPECTRA_APP_MODEL", str(family_dir("llama")))
    at = plan_page()
    at.button(key="auto_go").click().run()
    assert not at.exception, at.exception
    spec = str(family_dir("llama"))
    build = at.session_state[f"prebuild::{spec}"]
    compressed = sum(v["method"] != "dense" for v in at.session_state.plan_layers.values())
    assert build.total == compressed
    at.selectbox(key="preview_tokens").set_value(512).run()
    at.button(key="preview_go").click().run()
    assert not at.exception, at.exception
    assert not build.running and build.done == build.total
    assert at.session_state.preview_history[-1]["recompressed"] == 0
