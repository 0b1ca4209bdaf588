"""The registry is the one list of methods: every registered method reaches `plan auto`,
the app's menus and widgets, and round-trips its config; a method defined here, in
one `register(...)` call, plans, applies, previews and saves."""

import dataclasses
import json
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
import yaml

from compressors import lowrank
from compressors.base import config_to_dict
from compressors.method import Knob, Method
from compressors.registry import METHODS, make_config, module_methods, register
from spectra.io.model import open_model
from spectra.plan import run

ALL = list(METHODS)
MODULE = list(module_methods())  # those a plan applies to linear modules


def test_methods_in_display_order():
    assert ALL == ["lowrank", "joint", "losparse", "caldera", "mpo", "quant", "prune", "width"]
    assert ALL[:-1] == MODULE and METHODS["width"].scope == "block"


def test_width_reads_calibration_only_where_it_chooses_with_it():
    m = METHODS["width"]
    assert m.needs_data(make_config("width", ffn=8)) and m.needs_data(
        make_config("width", kv_heads=1)
    )
    assert not m.needs_data(make_config("width", ffn=8, select="norm"))
    assert not m.needs_data(make_config("width", skip="block", ffn=8))
    assert not m.needs_data(make_config("width"))


@pytest.mark.parametrize("name", ALL)
def test_knobs_are_the_config_fields_with_their_defaults(name):
    m = METHODS[name]
    assert m.name == name and m.summary and m.data in ("never", "optional", "whiten", "required")
    fields = {f.name: f.default for f in dataclasses.fields(m.config_cls)}
    assert [k.name for k in m.knobs] == list(fields)
    for k in m.knobs:
        assert k.help and "\n" not in k.help
        assert k.default == fields[k.name], k.name
        assert (k.kind == "choice") == bool(k.choices), k.name
    assert (m.data == "required") == (m.switch is None) or m.reads_data is not None


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("fmt", ["json", "yaml"])
def test_config_round_trips_through_a_plan(name, fmt):
    from spectra.plan import format as plans

    m = METHODS[name]
    config = make_config(name, **m.defaults(64, 48)) if m.defaults(64, 48) else m.config_cls()
    plan = plans.parse({"layers": {"model.layers.0.mlp.up_proj": config_to_dict(config)}})
    text = plans.dumps(plan, fmt)
    again = plans.parse(json.loads(text) if fmt == "json" else yaml.safe_load(text))
    assert again.layers["model.layers.0.mlp.up_proj"] == config


@pytest.mark.parametrize("name", ALL)
def test_needs_data_follows_the_description(name):
    m = METHODS[name]
    config = make_config(name, **m.defaults(64, 48))
    assert m.needs_data(config) == (m.data == "required")
    for flag in m.flags:
        flagged = dataclasses.replace(config, **{flag: True})
        assert m.needs_data(flagged)


def test_every_method_is_in_plan_auto_help_and_choices(capsys):
    from spectra.cli import build_parser
    from spectra.plan.grid import auto_methods

    with pytest.raises(SystemExit):
        build_parser().parse_args(["plan", "auto", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for name in (*MODULE, "mixed"):
        assert name in auto_methods()
        assert name in text


def test_every_method_is_in_the_app_menus_and_widgets():
    pytest.importorskip("streamlit")
    from app.views import knobs as kw
    from spectra.plan import edit as pe
    from spectra.plan.grid import auto_methods

    assert set(MODULE) <= set(pe.methods()) and set(MODULE) <= set(auto_methods())
    assert "width" not in pe.methods()  # a module's menu: width names blocks
    shown = pe.method_knobs()
    for name in MODULE:
        m = METHODS[name]
        assert set(shown[name]) <= set(pe.knobs())
        assert ("calibrated" in shown[name]) == (m.switch is not None)
        for k in m.columns:
            knob = m.knob(k)
            value = knob.default
            if value is None and knob.kind != "choice":
                value = knob.low or 1
            got = kw.widget(_Col(), knob, value, (64, 48))
            assert got == value or (got is None and value is None), k
    for k in pe.knobs():
        assert kw.column(k) is not None


class _Col:
    """A stand-in for a streamlit column: each widget returns its value."""

    def number_input(self, label, low, high, value, step):
        assert low <= value <= high, label
        return value

    def checkbox(self, label, value):
        return value

    def selectbox(self, label, options, index):
        return options[index]


# a method defined only here


@dataclass(frozen=True)
class HalfConfig:
    """Settings of `half`: the top `rank` singular triplets, no other knob."""

    method: ClassVar[str] = "half"
    rank: int = 4

    def __post_init__(self):
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError("rank must be >= 1")

    def check_shape(self, m: int, n: int) -> None:
        pass

    def cost(self, m: int, n: int) -> tuple[int, int]:
        return self.rank * (m + n), 16 * self.rank * (m + n)


def _compress(weight, config, calib=None):
    return lowrank.compress(weight, lowrank.LowRankConfig(rank=config.rank), calib)


def _grid(m, n, floor, spectral=False):
    return [HalfConfig(rank=r) for r in (1, 2, 4, 8) if r * (m + n) < m * n]


def _candidates(mod, dmg, floor, sigma=None, quick=False):
    out = []
    for c in _grid(*mod.shape, floor):
        e = mod.weight - _compress(mod.weight, c).to_dense().to(mod.weight.dtype)
        out.append((c, dmg(mod, e)))
    return out


HALF = Method(
    name="half",
    config_cls=HalfConfig,
    compress=_compress,
    summary="a test method: the top singular triplets",
    paper="",
    data="never",
    knobs=(Knob("rank", "kept rank", 4, "int", 1),),
    columns=("rank",),
    defaults=lambda m, n: {"rank": 2},
    grid=_grid,
    candidates=_candidates,
)


@pytest.fixture()
def half():
    register(HALF)
    yield HALF
    del METHODS["half"]


def test_a_method_registered_once_plans_applies_previews_and_saves(half, family_dir, tmp_path):
    from compressors import io
    from compressors.apply import asdict
    from spectra.plan import edit as pe
    from spectra.plan import format as plans
    from spectra.plan.auto import auto_plan
    from spectra.plan.grid import auto_methods
    from spectra.preview import Previewer, module_error

    spec = str(family_dir("llama"))
    assert "half" in auto_methods() and "half" in pe.methods()
    result = auto_plan(
        open_model(spec), "half", target_params=0.6, sensitivity="none", use_cache=False
    )
    assert {c.method for c in result.plan.layers.values()} == {"half"}
    text = plans.dumps(result.plan)
    plan = plans.parse(yaml.safe_load(text))
    model, tok = open_model(spec, "cpu", "float32", "none").load(), open_model(spec).tokenizer()
    compressed, reports, facts = run.apply_plan(model, plan)
    assert reports and {r.method for r in reports} == {"half"}
    name = next(iter(plan.layers))
    mat = next(m for m in open_model(spec).matrices if m.name == name)
    settings = pe.settings_of({"module": name, "method": "half", "m": 64, "n": 64})
    assert settings == {"method": "half", "rank": 2}  # its own defaults
    row = pe.row(mat, settings)
    assert row["method"] == "half" and row["rank"] == 2 and row["calibrated"] is None
    w = facts[name].to_dense()
    assert module_error(w, plan.layers[name]) == pytest.approx(0.0, abs=1e-5)
    pv = Previewer(model, tok, seqlen=32)
    assert pv.preview(dict(plan.layers), 256).ppl > 0
    report = {"modules": [asdict(r) for r in reports]}
    io.save(tmp_path / "out", compressed, facts, text, report)
    again, _ = io.load(tmp_path / "out")
    x = torch.randint(0, 100, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(again(x).logits, compressed(x).logits, atol=1e-5, rtol=1e-5)
