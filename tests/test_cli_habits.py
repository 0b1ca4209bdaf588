"""The command line's habits (issue 32): --version, examples at the end of --help, a port
in use, a misspelt model, and `plan auto`'s calibration line and fallback warning."""

import json
import socket

import yaml

from spectra import __version__


def one_error_line(r, needle: str) -> str:
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert lines[0].startswith("spectra: error:") and needle in lines[0], lines[0]
    return lines[0]


def test_version(cli):
    r = cli("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"spectra {__version__}"


def test_help_ends_with_three_example_commands(cli):
    r = cli("--help")
    assert r.returncode == 0
    tail = r.stdout.rstrip().splitlines()[-4:]
    assert tail[0] == "examples:"
    assert all(line.strip().startswith("spectra ") for line in tail[1:]), tail
    # each example is a command this parser accepts (plan auto's needs no method or budget)
    from spectra.cli import build_parser

    for line in tail[1:]:
        build_parser().parse_args(line.split()[1:])


def test_a_port_in_use_exits_2_with_one_line(cli):
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        line = one_error_line(cli("app", "demo", "--port", port), f"--port {port}")
    assert "in use" in line


def test_app_refuses_a_model_too_big_before_starting(cli, tiny_llama_dir, monkeypatch):
    monkeypatch.setenv("SPECTRA_MEMORY_GB", "0.0001")
    line = one_error_line(cli("app", tiny_llama_dir, "--offload", "none"), "GB")
    assert "--offload none" in line and "free" in line


def test_a_misspelt_model_suggests_demo(cli):
    line = one_error_line(cli("analyze", "dmeo"), "dmeo")
    assert line.endswith("(did you mean demo?)")


def test_a_misspelt_path_suggests_the_nearest_one(cli, tmp_path):
    (tmp_path / "my-model").mkdir()
    (tmp_path / "other").mkdir()
    line = one_error_line(cli("analyze", tmp_path / "my-modle"), "my-modle")
    assert line.endswith(f"(did you mean {tmp_path / 'my-model'}?)")
    line = one_error_line(cli("analyze", tmp_path / "zzzzzzzz"), "zzzzzzzz")
    assert "did you mean" not in line


def test_plan_auto_computes_a_small_calibration_and_names_it(family_dir, tmp_path, cli):
    """With no calibration cached, `plan auto MODEL` (no method, no budget) computes the
    small one first, scores the calibrated damage with whitened low rank at 80% of the
    parameters, and names the calibration (tokens, key); a second run reuses it."""
    path = family_dir("llama")
    out = tmp_path / "plan.yaml"
    r = cli("plan", "auto", path, "-o", out)
    assert r.returncode == 0, r.stderr
    assert "warning" not in r.stderr
    line = next(x for x in r.stdout.splitlines() if x.startswith("calibration:"))
    assert "4,096 tokens of builtin" in line and ", key " in line
    key = line.rsplit("key ", 1)[1]
    plan = yaml.safe_load(out.read_text())
    assert plan["calibration"]["samples"] * plan["calibration"]["seqlen"] == 4096
    inner = {k: v for k, v in plan["layers"].items() if k.startswith("model.layers.")}
    assert inner and all(v["method"] == "lowrank" and v["whiten"] for v in inner.values())
    r = cli("plan", "auto", path, "-o", out, "--json")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["sensitivity"] == "calib" and summary["calibration"]["key"] == key
    assert summary["calibration"]["tokens"] == 4096
    assert 0.79 <= summary["params_ratio"] <= 0.8


def test_plan_auto_falls_back_with_one_warning_saying_how_to_calibrate(
    tiny_llama_dir, tmp_path, cli
):
    """A model without a tokenizer cannot be calibrated: one warning line, data-free."""
    out = tmp_path / "plan.yaml"
    r = cli("plan", "auto", tiny_llama_dir, "-o", out, "--json")
    assert r.returncode == 0, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("spectra: warning:"), r.stderr
    assert "weight error" in lines[0] and "spectra calibrate" in lines[0]
    summary = json.loads(r.stdout)
    assert summary["sensitivity"] == "none" and summary["calibration"] is None


def test_every_argument_of_every_command_has_a_help_string():
    import argparse

    from spectra.cli import build_parser

    def walk(parser, path):
        for a in parser._actions:
            if isinstance(a, argparse._SubParsersAction):
                helps = {c.dest: c.help for c in a._choices_actions}
                for name, sub in a.choices.items():
                    yield f"{path} {name}", helps.get(name)
                    yield from walk(sub, f"{path} {name}")
            elif not isinstance(a, argparse._HelpAction):
                yield f"{path} {'/'.join(a.option_strings) or a.dest}", a.help

    found = list(walk(build_parser(), "spectra"))
    assert len(found) > 60
    assert [what for what, text in found if not text] == []
