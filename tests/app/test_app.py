"""The app renders with Streamlit's AppTest on a tiny model (no browser needed)."""

from pathlib import Path

from streamlit.testing.v1 import AppTest

MAIN = str(Path(__file__).resolve().parents[2] / "app" / "main.py")


def test_model_page_lists_the_matrices(tiny_llama_dir, monkeypatch):
    monkeypatch.setenv("SPECTRA_APP_MODEL", str(tiny_llama_dir))
    at = AppTest.from_file(MAIN, default_timeout=60).run()
    assert not at.exception
    assert at.metric[0].value == "16"
    table = at.dataframe[0].value
    assert len(table) == 16 and "model.layers.1.mlp.down_proj" in list(table["name"])


def test_bad_path_shows_an_error_not_a_traceback(tmp_path, monkeypatch):
    monkeypatch.setenv("SPECTRA_APP_MODEL", str(tmp_path / "missing"))
    at = AppTest.from_file(MAIN, default_timeout=60).run()
    assert not at.exception
    assert "no such model" in at.error[0].value
