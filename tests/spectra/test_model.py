"""One model object (spectra.io.model): each fact computed once, one cache key rule, and
`spectra apply` resolving its model once instead of re-reading it at every step."""

import sys
from pathlib import Path

import pytest
import yaml

import spectra
from spectra.cli import main
from spectra.io import model as model_module
from spectra.io import models
from spectra.io.model import open_model

MODELS_PY = str(Path(models.__file__).resolve())


def entries_into_models(argv) -> list[str]:
    """Run `spectra ARGV` in this process and list the calls into spectra/io/models.py
    from outside that file (its own helpers calling each other do not count)."""
    entered: list[str] = []

    def profile(frame, event, arg):
        code = frame.f_code
        if event == "call" and code.co_filename == MODELS_PY and code.co_name != "<module>":
            caller = frame.f_back
            if caller is not None and caller.f_code.co_filename != MODELS_PY:
                entered.append(code.co_qualname)

    sys.setprofile(profile)
    try:
        code = main([str(a) for a in argv])
    finally:
        sys.setprofile(None)
    assert code == 0
    return entered


@pytest.mark.parametrize("whiten", [False, True], ids=["data-free", "calibrated"])
def test_apply_resolves_its_model_at_most_twice(family_dir, tmp_path, whiten):
    path = family_dir("llama")
    rule = {"targets": [r"re:model\.layers\.\d+\.mlp\.(gate|up)_proj"], "method": "lowrank"}
    plan = {"version": 1, "rules": [{**rule, "rank": 8, "whiten": whiten}]}
    if whiten:
        plan["calibration"] = {"samples": 2, "seqlen": 32}
    (tmp_path / "plan.yaml").write_text(yaml.safe_dump(plan))
    argv = ["apply", tmp_path / "plan.yaml", "--model", path, "-o", tmp_path / "out"]
    entered = entries_into_models(argv)
    # open_model's resolve and resolve_device: the rest reads the one Model object
    assert len(entered) <= 2, entered
    assert (tmp_path / "out" / "manifest.json").is_file()


def test_facts_are_computed_once(tiny_llama_dir, monkeypatch):
    model = open_model(str(tiny_llama_dir), "cpu")
    calls = []
    listed = model_module.matrices
    monkeypatch.setattr(model_module, "matrices", lambda s: calls.append(s) or listed(s))
    first = model.fingerprint
    assert model.matrices is model.matrices and model.fingerprint == first
    assert len(calls) == 1
    assert model.matrix("model.layers.0.mlp.up_proj").shape == (96, 64)
    with pytest.raises(spectra.SpectraInputError, match="no 2-D weight named nope"):
        model.matrix("nope")


def test_cache_key_names_the_working_dtype_of_what_runs(tiny_llama_dir):
    f32 = open_model(str(tiny_llama_dir), "cpu", "float32")
    bf16 = open_model(str(tiny_llama_dir), "cpu", "bfloat16")
    assert f32.fingerprint == bf16.fingerprint  # the same weights
    assert f32.cache_key("x") != bf16.cache_key("x")  # a run's result differs by dtype
    assert f32.cache_key("x", runs=False) == bf16.cache_key("x", runs=False)  # spectra do not
    assert f32.cache_key("x") != f32.cache_key("y")


def test_correlation_cache_keys_the_dtype(family_dir):
    """A bfloat16 sensitivity was read from (and written to) the float32 entry."""
    from spectra.plan import sensitivity as sens
    from spectra.plan import sensitivity_report

    path = str(family_dir("llama"))
    settings = sens.SensitivitySettings("fisher", tokens=64, seqlen=32)
    got = {}
    for dtype in ("float32", "bfloat16", "float32"):
        info: dict = {}
        table = sensitivity_report.sensitivity_table(
            open_model(path, "cpu", dtype, "none"), settings, info=info
        )
        got.setdefault(dtype, []).append((info["path"], info["cached"], table))
    (path32, cached32, t32), (again, cached_again, _) = got["float32"]
    (path16, cached16, t16) = got["bfloat16"][0]
    assert path16 != path32 and not cached16  # computed in bfloat16, kept apart
    assert again == path32 and cached_again and not cached32
    assert t16["score"].to_list() != t32["score"].to_list()


def test_an_apply_output_opens_as_a_model_of_its_own_kind(tiny_llama_dir, tmp_path):
    plan = {
        "version": 1,
        "rules": [{"targets": [r"re:.*mlp\.up_proj"], "method": "lowrank", "rank": 4}],
    }
    (tmp_path / "plan.yaml").write_text(yaml.safe_dump(plan))
    out = tmp_path / "out"
    assert (
        main(["apply", str(tmp_path / "plan.yaml"), "--model", str(tiny_llama_dir), "-o", str(out)])
        == 0
    )
    compressed = spectra.open_model(out, "cpu")
    dense = spectra.open_model(tiny_llama_dir, "cpu")
    assert (compressed.kind, dense.kind) == ("compressed", "model")
    assert compressed.baseline().fingerprint == dense.fingerprint
    network = compressed.load()
    assert type(network.model.layers[0].mlp.up_proj).__name__ != "Linear"
    with pytest.raises(spectra.SpectraInputError, match="no usable tokenizer"):
        compressed.tokenizer()
