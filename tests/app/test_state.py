"""The app runs the model as `spectra app` opened it (dtype, offload) in every action:
Auto-allocate's calibrated damage and the sensitivities included (AppTest, no browser)."""

import tempfile
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from spectra.io import model as model_module


def script(name: str, body: str) -> str:
    path = Path(tempfile.gettempdir()) / f"spectra_app_state_{name}.py"
    path.write_text(body)
    return str(path)


@pytest.fixture()
def builds(monkeypatch):
    """Every resident model built (spectra.io.model.build), as (spec, dtype)."""
    made = []
    build = model_module.build

    def spy(source, device, dtype=None):
        made.append((source.spec, str(dtype)))
        return build(source, device, dtype)

    monkeypatch.setattr(model_module, "build", spy)
    return made


def test_auto_allocate_under_offload_disk_keeps_no_resident_copy(family_dir, monkeypatch, builds):
    monkeypatch.setenv("SPECTRA_APP_MODEL", str(family_dir("llama")))  # with a tokenizer
    monkeypatch.setenv("SPECTRA_APP_OFFLOAD", "disk")
    at = AppTest.from_file(
        script("plan", "from app.views import plan_page\nplan_page.render()\n"),
        default_timeout=300,
    ).run()
    at.button(key="auto_go").click().run()
    assert not at.exception, at.exception
    layers = at.session_state.plan_layers
    assert layers and all(v["method"] == "lowrank" and v.get("whiten") for v in layers.values())
    # the calibration and the loss weights ran on the streamed skeleton: nothing resident
    assert builds == []


def test_sensitivities_are_kept_apart_by_the_working_dtype(family_dir, monkeypatch):
    """A bfloat16 app's sensitivity was cached as float32's, and read back by it."""
    monkeypatch.setenv("SPECTRA_APP_MODEL", str(family_dir("llama")))
    body = (
        "import streamlit as st\n"
        "from app import state\n"
        "df = state.sensitivity_scores(state.model_spec(), 'fisher', 512)\n"
        "st.write(' '.join(repr(v) for v in df['score'].to_list()))\n"
    )
    scores = {}
    for dtype in ("bfloat16", "float32"):
        monkeypatch.setenv("SPECTRA_APP_DTYPE", dtype)
        at = AppTest.from_file(script(f"sens_{dtype}", body), default_timeout=300).run()
        assert not at.exception, at.exception
        scores[dtype] = at.markdown[0].value
    assert scores["bfloat16"] != scores["float32"]


def test_auto_allocate_offers_the_llama_cpp_preset(family_dir, monkeypatch):
    """The "quant (llama.cpp)" choice allocates only the grids a GGUF export keeps with their own
    codes, as `plan auto --method quant --preset llama.cpp` does."""
    monkeypatch.setenv("SPECTRA_APP_MODEL", str(family_dir("llama")))
    at = AppTest.from_file(
        script("plan_preset", "from app.views import plan_page\nplan_page.render()\n"),
        default_timeout=300,
    ).run()
    at.selectbox(key="auto_method").set_value("quant:llama.cpp").run()
    at.radio(key="auto_kind").set_value("bits").run()
    at.number_input(key="auto_target_bits").set_value(6.0).run()
    at.selectbox(key="auto_sens").set_value("none").run()
    at.button(key="auto_go").click().run()
    assert not at.exception, at.exception
    layers = at.session_state.plan_layers
    assert layers and {v["method"] for v in layers.values()} == {"quant"}
    assert all(v["group_size"] == 32 and v["symmetric"] for v in layers.values())
    assert {v["bits"] for v in layers.values()} <= {4, 8}


def test_row_errors_of_plain_low_rank_under_a_calibration_match_a_compression(
    family_dir, monkeypatch
):
    """A row edit of plain low rank with a calibration reads both errors off one
    factorization of the weight; each equals the rank's compression, as apply builds it."""
    monkeypatch.setenv("SPECTRA_APP_MODEL", str(family_dir("llama")))
    body = (
        "import streamlit as st\n"
        "from app import state\n"
        "from compressors.registry import make_config\n"
        "from spectra.preview import module_errors\n"
        "spec = state.model_spec()\n"
        "key = str(state.compute_calibration(spec).folder)\n"
        "name = 'model.layers.1.mlp.down_proj'\n"
        "w = state.opened(spec).matrix(name).read()\n"
        "calib = state._module_calibration(spec, name, key)\n"
        "import spectra.preview as sp\n"
        "calls, real = [], sp.compress\n"
        "sp.compress = lambda *a, **k: calls.append(1) or real(*a, **k)\n"
        "for k in (1, 3, 6):\n"
        "    fast = state.row_error(spec, name, (('method', 'lowrank'), ('rank', k)), key)\n"
        "    n = len(calls)\n"
        "    slow = module_errors(w, make_config('lowrank', rank=k), calib=calib)\n"
        "    st.write(repr((n, *fast, *slow)))\n"
    )
    at = AppTest.from_file(script("plain_rows", body), default_timeout=300).run()
    assert not at.exception, at.exception
    rows = [eval(m.value) for m in at.markdown[:3]]
    for i, (compressions, fast_w, fast_h, slow_w, slow_h) in enumerate(rows):
        assert compressions == i  # only the reference compressed: the row read its curve
        assert fast_h is not None and 0 < fast_h < 1
        assert fast_w == pytest.approx(slow_w, rel=1e-4) and fast_h == pytest.approx(
            slow_h, rel=1e-4
        )
    assert len({r[2] for r in rows}) == 3  # each rank its own calibrated error
