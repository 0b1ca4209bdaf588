"""The Plan page's default path (issue 32): the first Auto-allocate with nothing changed
calibrates first and allocates whitened low rank on the calibrated loss estimate."""

import pytest
from streamlit.testing.v1 import AppTest
from test_app import page_script, run_page


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


def test_the_heatmap_hover_names_module_and_metric_and_picks_persist(on_tiny):
    import json

    at = run_page("spectra_page")
    assert not at.exception, at.exception
    fig = json.loads(at.get("plotly_chart")[0].proto.spec)
    cells = next(t for t in fig["data"] if t["type"] == "scatter")
    assert "model.layers.1.mlp.down_proj" in [c[0] for c in cells["customdata"]]
    assert "effective rank" in cells["hovertemplate"]
    assert "%{customdata[0]}" in cells["hovertemplate"]
    at.multiselect(key="spectra_selected").set_value(["model.layers.0.mlp.up_proj"]).run()
    assert at.session_state.spectra_picked == ["model.layers.0.mlp.up_proj"]
    # back from another page: Streamlit dropped the widget's state, the pick stays
    again = AppTest.from_file(page_script("spectra_page"), default_timeout=120)
    again.session_state["spectra_picked"] = at.session_state.spectra_picked
    again.run()
    assert again.multiselect(key="spectra_selected").value == ["model.layers.0.mlp.up_proj"]


def test_a_heatmap_click_adds_its_module_once(on_tiny, monkeypatch):
    """A click comes back from Streamlit as the selected point's customdata."""
    from app.views import spectra_page

    name = "model.layers.1.mlp.up_proj"
    event = {"selection": {"points": [{"customdata": [name, 1.0], "x": 1, "y": "up"}]}}
    monkeypatch.setattr(spectra_page.st, "plotly_chart", lambda *a, **k: event)
    at = run_page("spectra_page")
    assert name in at.multiselect(key="spectra_selected").value
    at.multiselect(key="spectra_selected").set_value([]).run()  # the same selection, rerun
    assert at.multiselect(key="spectra_selected").value == []  # not re-added


def test_a_preview_of_a_changed_plan_is_marked_out_of_date(on_bos_llama):
    at = run_page("plan_page")
    at.button(key="auto_go").click().run()
    assert not at.error, [e.value for e in at.error]
    assert not at.exception, at.exception
    at.selectbox(key="preview_tokens").set_value(512).run()
    at.button(key="preview_go").click().run()
    assert not at.exception, at.exception
    assert not any("Out of date" in w.value for w in at.warning)
    row = at.session_state.preview_history[-1]
    assert row["recompressed"] == 0  # Auto-allocate built the plan's modules already
    assert row["damage"] == "auto: calibration-weighted loss"
    assert row["calibration"].startswith("4,096 tokens, ")
    assert "lowrank x" in row["settings"] and "whiten x" in row["settings"]
    name = next(iter(at.session_state.plan_layers))
    tag = repr(sorted(at.session_state.plan_layers[name].items()))
    at.selectbox(key="plan_module").set_value(name).run()
    at.selectbox(key=f"pm_method::{name}::{tag}").set_value("dense").run()
    assert any("Out of date" in w.value for w in at.warning)
    labels = [m.label for m in at.metric]
    assert "Compressed perplexity (out of date)" in labels


def test_both_error_columns_fill_for_every_listed_module(on_bos_llama):
    at = run_page("plan_page")
    at.button(key="auto_go").click().run()
    at.toggle(key="plan_only").set_value(False).run()
    df = at.data_editor[0].value
    dense = df[df["method"] == "dense"]
    assert (dense["rel_error"] == 0).all() and (dense["calib_error"] == 0).all()
    assert at.button(key="fill_errors").label.startswith("Compute the missing errors")
    at.button(key="fill_errors").click().run()
    assert not at.exception, at.exception
    df = at.data_editor[0].value
    inner = df[df["module"].str.startswith("model.layers.")]
    assert inner["rel_error"].notna().all() and inner["calib_error"].notna().all()
    assert not any(b.key == "fill_errors" for b in at.button) or df["rel_error"].isna().any()
