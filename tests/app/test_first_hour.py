"""The Plan page's default path (issue 32): the first Auto-allocate with nothing changed
calibrates first and allocates whitened low rank on the calibrated loss estimate."""

import pytest
from test_app import run_page


@pytest.fixture()
def on_tiny(tiny_llama_dir, monkeypatch):
    """A tiny Llama without a tokenizer: it cannot be calibrated."""
    monkeypatch.setenv("SPECTRA_APP_MODEL", str(tiny_llama_dir))
    return tiny_llama_dir


@pytest.fixture()
def on_bos_llama(family_dir, monkeypatch):
    """A tiny Llama with a tokenizer."""
    path = family_dir("llama")
    monkeypatch.setenv("SPECTRA_APP_MODEL", str(path))
    return path


def test_first_auto_allocate_calibrates_and_uses_the_calibrated_damage(on_bos_llama):
    at = run_page("plan_page")
    assert any("No calibration" in c.value for c in at.caption)
    at.button(key="auto_go").click().run()
    assert not at.exception, at.exception
    assert any("Calibration: 4,096 tokens" in c.value for c in at.caption)
    layers = at.session_state.plan_layers
    inner = {k: v for k, v in layers.items() if k.startswith("model.layers.")}
    assert inner and all(v["method"] == "lowrank" and v["whiten"] for v in inner.values())
    kept = next(m.value for m in at.metric if m.label == "Parameters kept")
    assert 75.0 <= float(kept.rstrip("%")) <= 80.0
    message = at.info[0].value
    assert "calibration-weighted loss" in message and "nats/token" in message
    assert "x dense" in message


def test_the_data_free_damage_is_labelled_and_says_what_its_estimate_is(on_bos_llama):
    at = run_page("plan_page")
    at.selectbox(key="auto_sens").set_value("none").run()
    assert any("Data-free" in c.value for c in at.caption)
    at.button(key="auto_go").click().run()
    assert not at.exception, at.exception
    message = at.info[0].value
    assert "weight error (data-free)" in message and "not a loss" in message
    assert not any(v.get("whiten") for v in at.session_state.plan_layers.values())


def test_a_model_without_tokenizer_falls_back_with_a_warning(on_tiny):
    at = run_page("plan_page")
    at.button(key="auto_go").click().run()
    assert not at.exception, at.exception
    assert "cannot be calibrated" in at.warning[0].value
    assert at.session_state.plan_layers


def test_the_module_table_is_typed_blocks_as_numbers_blanks_empty(on_tiny):
    at = run_page("plan_page")
    at.selectbox(key="auto_sens").set_value("none").run()
    at.button(key="auto_go").click().run()
    at.toggle(key="plan_only").set_value(False).run()
    df = at.data_editor[0].value
    assert str(df["block"].dtype).startswith("float") or str(df["block"].dtype) == "Int64"
    for column in ("energy", "sparsity", "bits", "bond_dim", "cores"):
        assert df[column].dtype != object, column  # typed: an unset cell is blank
    assert "None" not in set(map(str, df["pattern"].dropna()))
    size = next(c.value for c in at.caption if c.value.startswith("from "))
    assert "fp16 storage" in size
