"""The app renders and reacts with Streamlit's AppTest on a tiny model (no browser)."""

import tempfile
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

MAIN = str(Path(__file__).resolve().parents[2] / "app" / "main.py")
PAGES = ["model", "spectra_page", "tensor_network", "sensitivity_page", "plan_page", "export"]


def page_script(page: str):
    """An AppTest script that renders one page module (the router is tested apart)."""
    src = f"from app.views import {page}\n{page}.render()\n"
    path = Path(tempfile.gettempdir()) / f"spectra_app_page_{page}.py"
    path.write_text(src)
    return str(path)


@pytest.fixture()
def on_tiny(tiny_llama_dir, monkeypatch):
    monkeypatch.setenv("SPECTRA_APP_MODEL", str(tiny_llama_dir))
    return tiny_llama_dir


def run_page(page: str) -> AppTest:
    """A page once its background analyses are in (they redraw it until then)."""
    return settled(AppTest.from_file(page_script(page), default_timeout=120).run())


def progress_texts(at) -> list[str]:
    return [p.proto.text for p in at.get("progress")]


def settled(at: AppTest, timeout: float = 120) -> AppTest:
    """Rerun `at` until no background analysis shows its progress (a browser's page
    redraws itself; AppTest does not run fragments on a timer)."""
    import time

    end = time.monotonic() + timeout
    while any(t.startswith(("Spectra:", "Bond profiles:")) for t in progress_texts(at)):
        assert time.monotonic() < end, progress_texts(at)
        time.sleep(0.2)
        at.run()
    return at


def test_router_opens_on_the_model_page(on_tiny):
    at = AppTest.from_file(MAIN, default_timeout=120).run()
    assert not at.exception
    assert at.title[0].value == "Model"
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["2-D weights"] == "16" and metrics["Working dtype"] == "float32"
    line = at.markdown[0].value  # in full, not cut to a metric's width
    assert "LlamaForCausalLM (`llama`)" in line and "**Stored as** safetensors F32" in line
    assert not at.warning
    table = at.dataframe[0].value
    assert len(table) == 16 and "model.layers.1.mlp.down_proj" in list(table["name"])
    held = [c.value for c in at.caption if c.value.startswith("Runs in")]
    assert held and held[0].startswith("Runs in float32 on cpu, resident: about")


def test_the_model_page_renders_before_any_spectrum_is_computed(on_tiny, monkeypatch):
    """Its summary comes from config and headers; the spectra follow in the background."""
    import threading

    from spectra.background import AnalysisJob

    gate = threading.Event()
    compute = AnalysisJob._compute
    monkeypatch.setattr(AnalysisJob, "_compute", lambda job: gate.wait(60) and compute(job))
    at = AppTest.from_file(MAIN, default_timeout=120).run()
    try:
        assert not at.exception, at.exception
        assert {m.label: m.value for m in at.metric}["2-D weights"] == "16"
        assert len(at.dataframe[0].value) == 16
        assert any(t.startswith("Spectra: 0/16 matrices") for t in progress_texts(at))
    finally:
        gate.set()
    settled(at)
    assert any(c.value.startswith("Spectra of 16 distinct matrices computed") for c in at.caption)
    again = AppTest.from_file(MAIN, default_timeout=120).run()  # another session: all in
    assert any(c.value.startswith("Spectra of 16 distinct matrices") for c in again.caption)
    assert not progress_texts(again)


def test_a_model_replaced_while_the_app_runs_is_one_message(tiny_llama_dir, tmp_path, monkeypatch):
    import shutil

    from conftest import save_tiny_llama

    d = tmp_path / "m"
    shutil.copytree(tiny_llama_dir, d)
    monkeypatch.setenv("SPECTRA_APP_MODEL", str(d))
    at = run_page("model")
    assert not at.exception and not at.error
    for page, size in (("model", 48), ("spectra_page", 32)):
        shutil.rmtree(d)
        save_tiny_llama(d, intermediate_size=size)  # another model under the same name
        at = AppTest.from_file(page_script(page), default_timeout=120).run()
        assert not at.exception, at.exception
        assert len([e for e in at.error if "replaced while the app was running" in e.value]) == 1
        at = run_page(page)  # the next run opens the new weights
        assert not at.exception and not at.error, page
    assert 32 in set(at.dataframe[0].value["shape_n"])


def test_model_page_and_previews_stream_when_asked(family_dir, monkeypatch):
    """`spectra app --offload disk --dtype bfloat16`: the Model page says so, and the
    Previewer runs the skeleton (blocks read from disk) in bfloat16."""
    monkeypatch.setenv("SPECTRA_APP_MODEL", str(family_dir("llama")))  # with a tokenizer
    monkeypatch.setenv("SPECTRA_APP_OFFLOAD", "disk")
    monkeypatch.setenv("SPECTRA_APP_DTYPE", "bfloat16")
    at = AppTest.from_file(MAIN, default_timeout=120).run()
    assert not at.exception
    assert {m.label: m.value for m in at.metric}["Working dtype"] == "bfloat16"
    held = [c.value for c in at.caption if c.value.startswith("Runs in")]
    assert held and "streamed from disk one block at a time" in held[0]
    script = Path(tempfile.gettempdir()) / "spectra_app_streamed_previewer.py"
    script.write_text(
        "import streamlit as st\n"
        "from app import state\n"
        "from compressors import blocks\n"
        "from compressors.registry import make_config\n"
        "pv = state.previewer(state.model_spec())\n"
        "r = pv.preview({'model.layers.1.mlp.down_proj': make_config('lowrank', rank=4)}, 1024)\n"
        "st.write(f'{blocks.is_streamed(pv.work)} {blocks.working_dtype(pv.work)} {r.ppl}')\n"
    )
    at = AppTest.from_file(str(script), default_timeout=300).run()
    assert not at.exception, at.exception
    streamed, dtype, ppl = at.markdown[0].value.split()
    assert streamed == "True" and dtype == "torch.bfloat16" and float(ppl) > 1


@pytest.mark.parametrize("page", PAGES)
def test_every_page_renders_without_exception(on_tiny, page):
    at = run_page(page)
    assert not at.exception, at.exception
    assert at.title[0].value.lower().replace(" ", "_") in page.replace("_page", "")


def test_bad_path_shows_an_error_not_a_traceback(tmp_path, monkeypatch):
    monkeypatch.setenv("SPECTRA_APP_MODEL", str(tmp_path / "missing"))
    for page in PAGES:
        at = run_page(page)
        assert not at.exception, page
        assert "no such model" in at.error[0].value, page


def test_a_directory_without_config_is_explained(tmp_path, tiny_llama_dir, monkeypatch):
    import shutil

    shutil.copy(tiny_llama_dir / "model.safetensors", tmp_path / "model.safetensors")
    monkeypatch.setenv("SPECTRA_APP_MODEL", str(tmp_path))
    at = run_page("model")
    assert not at.exception and not at.error
    assert "has no config.json" in at.warning[0].value and "previews" in at.warning[0].value
    assert {m.label: m.value for m in at.metric}["2-D weights"] == "16"


def test_the_heatmap_has_integer_block_ticks_and_curves_are_decimated(on_tiny):
    import json

    from app.views.charts import block_ticks, decimate

    at = run_page("spectra_page")
    fig = json.loads(at.get("plotly_chart")[0].proto.spec)
    assert fig["layout"]["xaxis"]["tickvals"] == [0, 1]
    assert block_ticks(list(range(32))) == list(range(0, 32, 2))
    for n in (1, 5, 400, 3584, 152064):
        idx = decimate(n)
        assert idx[0] == 0 and idx[-1] == n - 1 and len(idx) <= 400
        assert (idx[1:] > idx[:-1]).all()


def test_log_ticks_are_readable():
    from app.views.charts import log_ticks

    assert log_ticks(1e-5, 30) == [1e-05, 1e-04, 1e-03, 1e-02, 0.1, 1.0, 10.0]
    assert log_ticks(0.003, 0.4) == [0.005, 0.01, 0.02, 0.05, 0.1, 0.2]
    assert log_ticks(2.1, 4.5) == [3.0, 4.0]


def test_corrupt_file_shows_an_error(tmp_path, monkeypatch):
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    monkeypatch.setenv("SPECTRA_APP_MODEL", str(bad))
    at = run_page("model")
    assert not at.exception
    assert at.error and str(bad.name) in at.error[0].value


def relative_error(at) -> str:
    return next(m.value for m in at.metric if m.label == "Relative error")


def test_editing_a_rank_changes_the_shown_error(on_tiny):
    at = run_page("plan_page")
    name = "model.layers.1.mlp.down_proj"
    at.selectbox(key="plan_module").set_value(name).run()
    assert relative_error(at) == "0.0000"  # dense
    at.selectbox(key=f"pm_method::{name}::[]").set_value("lowrank").run()
    assert not at.exception
    first = relative_error(at)
    rank = next(n for n in at.number_input if n.label == "rank")
    assert rank.value == 64 * 96 // (2 * (64 + 96))
    rank.set_value(4).run()
    assert not at.exception
    second = relative_error(at)
    assert float(second) > float(first) > 0
    assert at.session_state.plan_layers[name] == {"method": "lowrank", "rank": 4}
    # the totals follow: one 64 x 96 module at rank 4 keeps 4 * 160 of its 6144
    kept = next(m.value for m in at.metric if m.label == "Parameters kept")
    total = 2 * (64 * 64 * 2 + 32 * 64 * 2 + 96 * 64 * 3) + 128 * 64
    assert kept == f"{(total - 64 * 96 + 4 * 160) / total:.1%}"


def test_table_edit_changes_the_plan(on_tiny):
    at = run_page("plan_page")
    key = f"plan_table_{at.session_state.plan_v}"
    base = at.session_state.plan_base
    index = next(i for i, r in enumerate(base) if r["module"].endswith("0.mlp.up_proj"))
    at.session_state[key] = {
        "edited_rows": {str(index): {"method": "quant", "bits": 3}},
        "added_rows": [],
        "deleted_rows": [],
    }
    at.run()
    assert not at.exception
    assert at.session_state.plan_layers["model.layers.0.mlp.up_proj"] == {
        "method": "quant",
        "bits": 3,
    }


def test_auto_allocate_fills_the_table(on_tiny):
    at = run_page("plan_page")
    at.number_input(key="auto_target_params").set_value(0.5)
    at.button(key="auto_go").click().run()
    assert not at.exception
    layers = at.session_state.plan_layers
    assert layers and all(v["method"] == "lowrank" for v in layers.values())
    kept = next(m.value for m in at.metric if m.label == "Parameters kept")
    assert float(kept.rstrip("%")) <= 50.0


def test_the_table_lists_compressed_modules_in_any_order(on_tiny):
    at = run_page("plan_page")
    assert len(at.session_state.plan_base) == 15  # nothing compressed: 14 linear + lm_head
    at.number_input(key="auto_target_params").set_value(0.5)
    at.button(key="auto_go").click().run()
    layers = at.session_state.plan_layers
    assert sorted(r["module"] for r in at.session_state.plan_base) == sorted(layers)
    at.selectbox(key="plan_sort").set_value("rank").run()
    at.toggle(key="plan_desc").set_value(True).run()
    assert not at.exception
    ranks = [r["rank"] for r in at.session_state.plan_base]
    assert ranks == sorted(ranks, reverse=True) and len(set(ranks)) > 1
    at.toggle(key="plan_only").set_value(False).run()
    assert len(at.session_state.plan_base) == 15


def upload(at, text: bytes) -> None:
    at.file_uploader(key="import_file").set_value(("plan.yaml", text, "application/x-yaml")).run()


def test_invalid_plan_file_on_import_shows_an_error(on_tiny):
    at = run_page("export")
    upload(at, b"layers:\n  model.layers.0.mlp.up_proj: {method: lowrank, rank: 0}\n")
    assert not at.exception
    assert "rank" in at.error[0].value and "plan.yaml" in at.error[0].value
    upload(at, b"layers:\n  model.layers.0.mlp.up_proj: {method: lowrank, rank: 5}\n")
    assert not at.error
    at.button(key="import_go").click().run()
    assert at.session_state.plan_layers == {
        "model.layers.0.mlp.up_proj": {
            "method": "lowrank",
            "rank": 5,
            "energy": None,
            "whiten": False,
            "factor_bits": 16,
            "factor_group_size": 64,
        }
    }


def test_plan_starts_afresh_for_another_model(on_tiny, tiny_gpt2_dir):
    at = run_page("plan_page")
    at.number_input(key="auto_target_params").set_value(0.5)
    at.button(key="auto_go").click().run()
    assert at.session_state.plan_layers
    at.session_state["model_spec"] = str(tiny_gpt2_dir)
    at.run()
    assert not at.exception and not at.error
    assert at.session_state.plan_layers == {}
    assert "transformer.h.0.mlp.c_fc" in [o for o in at.selectbox(key="plan_module").options]


@pytest.fixture()
def on_bos_llama(family_dir, monkeypatch):
    """A tiny Llama with a tokenizer (calibration needs one)."""
    path = family_dir("llama")
    monkeypatch.setenv("SPECTRA_APP_MODEL", str(path))
    return path


def test_a_calibrated_setting_shows_both_errors_and_previews(on_bos_llama):
    at = run_page("plan_page")
    at.selectbox(key="calib_tokens").set_value(4096).run()
    assert any("No calibration" in c.value for c in at.caption)
    at.button(key="calib_go").click().run()
    assert not at.exception
    assert any("Calibration: 4,096 tokens" in c.value for c in at.caption)
    name = "model.layers.1.mlp.down_proj"
    at.selectbox(key="plan_module").set_value(name).run()
    at.selectbox(key=f"pm_method::{name}::[]").set_value("lowrank").run()
    plain = {m.label: m.value for m in at.metric}
    assert float(plain["Calibration-weighted error"]) > 0  # a data-free setting, weighted
    box = next(c for c in at.checkbox if c.label == "calibrated")
    box.check().run()
    assert not at.exception
    assert at.session_state.plan_layers[name]["whiten"] is True
    white = {m.label: m.value for m in at.metric}
    assert float(white["Calibration-weighted error"]) < float(plain["Calibration-weighted error"])
    assert float(white["Relative error"]) > float(plain["Relative error"])  # Eckart-Young
    at.button(key="preview_go").click().run()
    assert not at.exception, at.exception
    got = {m.label: m.value for m in at.metric}
    assert float(got["Compressed perplexity"]) != float(got["Dense perplexity"])


def test_a_blocks_width_is_edited_with_its_errors_and_previewed(on_bos_llama):
    """The Plan page's block editor: fewer MLP neurons, then a removed attention, each a
    `width` entry named by the block with its calibration-weighted errors and the
    block's parameters kept (exact); the totals and the perplexity preview follow."""
    at = run_page("plan_page")
    at.button(key="calib_go").click().run()
    kept = next(m.value for m in at.metric if m.label == "Parameters kept")
    block = "model.layers.1"
    at.selectbox(key="plan_block").set_value(block).run()
    at.number_input(key=f"pw_ffn::{block}::[]").set_value(48).run()
    assert not at.exception, at.exception
    assert at.session_state.plan_layers[block] == {"method": "width", "ffn": 48}
    got = {m.label: m.value for m in at.metric}
    # q, o 64x64, k, v 32x64 (2 of 4 heads of 16), the MLP 3 x 64 x 48 of 3 x 64 x 96
    assert got["Block weights kept"] == f"{(2 * 4096 + 2 * 2048 + 3 * 64 * 48) / 30720:.1%}"
    assert 0 < float(got["MLP output error"]) < 1 and got["Key/value error"] == "0.0000"
    assert float(got["Parameters kept"].rstrip("%")) < float(kept.rstrip("%"))
    tag = repr(sorted({"method": "width", "ffn": 48}.items()))
    at.selectbox(key=f"pw_skip::{block}::{tag}").set_value("attention").run()
    assert at.session_state.plan_layers[block] == {
        "method": "width",
        "ffn": 48,
        "skip": "attention",
    }
    got = {m.label: m.value for m in at.metric}
    assert got["Key/value error"] == "1.0000"
    assert got["Block weights kept"] == f"{3 * 64 * 48 / 30720:.1%}"
    at.button(key="preview_go").click().run()
    assert not at.exception, at.exception
    got = {m.label: m.value for m in at.metric}
    assert float(got["Compressed perplexity"]) != float(got["Dense perplexity"])


def test_the_spectra_page_switches_to_activation_aware_spectra(on_bos_llama):
    at = run_page("spectra_page")
    at.radio(key="spectra_kind").set_value("activation-aware").run()
    assert not at.exception
    assert any("need a calibration" in c.value for c in at.caption)
    at.button(key="spectra_calib_go").click().run()
    assert not at.exception, at.exception
    assert at.selectbox(key="spectra_metric::True").options[0] == "effective rank"
    table = at.dataframe[-1].value
    assert "calib_erank" in table.columns and table["calib_erank"].notna().sum() == 14
    # each chosen block's intermediate activation spectrum beside the plan's width
    at.session_state.plan_layers = {"model.layers.0": {"method": "width", "ffn": 40}}
    at.multiselect(key="width_blocks").set_value(["model.layers.0", "model.layers.1"]).run()
    assert not at.exception, at.exception
    assert not [c.value for c in at.caption if "No calibration of" in c.value]
    frames = [d.value for d in at.dataframe]
    rows = next(f for f in frames if "top_width_energy" in f.columns).to_dict("records")
    assert [(r["block"], r["width"], r["neurons"]) for r in rows] == [
        ("model.layers.0", 40, 96),
        ("model.layers.1", 96, 96),
    ]
    assert 1 < rows[0]["erank"] <= 96 and rows[1]["top_width_energy"] == 1.0
    assert 0 < rows[0]["top_width_energy"] < 1


def test_export_page_exports_an_applied_plan(on_bos_llama, tmp_path):
    import json

    import yaml

    from spectra.cli import main

    plan = tmp_path / "plan.yaml"
    plan.write_text(
        yaml.safe_dump(
            {
                "version": 1,
                "rules": [
                    {
                        "targets": [r"re:model\.layers\.\d+\.mlp\.\w+_proj"],
                        "method": "quant",
                        "bits": 4,
                        "group_size": 32,
                        "symmetric": True,
                    }
                ],
            }
        )
    )
    out = tmp_path / "out"
    assert main(["apply", plan, "--model", on_bos_llama, "-o", out]) == 0
    at = run_page("export")
    assert "is not a `spectra apply` output" in at.caption[-1].value  # "compressed": none yet
    at.text_input(key="export_out").set_value(str(out)).run()
    at.radio(key="export_format").set_value("gguf").run()
    assert f"llama-cli -m {out}-gguf/model.gguf" in at.code[-1].value
    at.radio(key="export_format").set_value("compressed-tensors").run()
    assert f"vllm serve {out}-compressed-tensors" in at.code[-1].value
    at.button(key="export_go").click().run()
    assert not at.exception and not at.error
    assert "MB in" in at.success[0].value
    rows = at.dataframe[-1].value
    assert list(rows["stored"]) == ["pack-quantized int4"] and list(rows["modules"]) == [6]
    config = json.loads((tmp_path / "out-compressed-tensors" / "config.json").read_text())
    assert config["quantization_config"]["format"] == "pack-quantized"
    at.button(key="export_go").click().run()  # the DIR exists now: refused, one line
    assert "already exists" in at.error[0].value


def test_auto_allocate_by_alpha_records_the_strategy(on_tiny):
    at = run_page("plan_page")
    at.number_input(key="auto_target_params").set_value(0.5)
    at.selectbox(key="auto_allocate").set_value("alpha")
    at.button(key="auto_go").click().run()
    assert not at.exception
    assert at.session_state.plan_layers
    assert "by alpha (AlphaPruning)" in at.session_state.auto_message


def test_the_sensitivity_page_shows_which_metric_predicts_it(on_bos_llama):
    import json

    at = run_page("sensitivity_page")
    at.select_slider(key="sens_tokens_fisher").set_value(256)
    at.button(key="sens_compute").click().run()
    assert not at.exception, at.exception
    ranking = at.dataframe[-1].value  # the ranking, below the scatter
    assert "alpha" in list(ranking["metric"]) and ranking["rho"].abs().is_monotonic_decreasing
    chosen = at.selectbox(key="sens_metric").value
    assert chosen == ranking["metric"][0]  # the best predictor first
    figs = [json.loads(c.proto.spec) for c in at.get("plotly_chart")]
    scatter = next(f for f in figs if "Spearman rho" in f["layout"]["title"]["text"])
    roles = {t["name"].split(" ")[0] for t in scatter["data"]}
    assert {"q", "k", "v", "o", "gate", "up", "down"} <= roles  # coloured by role
    at.selectbox(key="sens_metric").set_value("erank").run()
    assert not at.exception
    figs = [json.loads(c.proto.spec) for c in at.get("plotly_chart")]
    assert any(f["layout"]["title"]["text"].startswith("erank vs") for f in figs)
