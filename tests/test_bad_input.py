"""Every command that takes a model meets the same bad models the same way: exit 2,
one line on stderr naming the problem, nothing written, the source untouched."""

import os
import shutil
import socket
from pathlib import Path

import pytest

from spectra.cli import main


def _tiny_gguf(path: Path) -> Path:
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(path, "llama")
    w.add_block_count(1)
    w.add_tensor("blk.0.ffn_up.weight", np.ones((64, 32), np.float32))
    w.add_tensor("blk.0.ffn_down.weight", np.ones((32, 64), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _cut(path: Path, keep: int) -> Path:
    """Keep the first `keep` bytes (all but the last -keep when negative)."""
    path.write_bytes(path.read_bytes()[:keep])
    return path


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _copy_weights(work: Path, src: Path, config: bool) -> Path:
    shutil.copy(src / "model.safetensors", work / "model.safetensors")
    if config:
        shutil.copy(src / "config.json", work / "config.json")
    return work


# name -> (make the bad model in `work` from the tiny model `src`, words the error names)
MODELS = {
    "missing-path": (lambda w, s: w / "nope", "no such model"),
    "missing-gguf": (lambda w, s: "no-such-dir/model.gguf", "no such model"),
    "missing-safetensors": (lambda w, s: w / "nope" / "model.safetensors", "no such model"),
    "no-weights": (lambda w, s: w, "no safetensors weights"),
    "corrupt-safetensors": (
        lambda w, s: _write(w / "model.safetensors", os.urandom(300)).parent,
        "safetensors",
    ),
    "truncated-safetensors": (
        lambda w, s: _cut(_copy_weights(w, s, True) / "model.safetensors", -1000).parent,
        "truncated safetensors",
    ),
    "corrupt-gguf": (lambda w, s: _write(w / "m.gguf", b"GGUF\3\0\0\0" + b"\xff" * 64), "GGUF"),
    "truncated-gguf": (lambda w, s: _cut(_tiny_gguf(w / "m.gguf"), 5000), "truncated GGUF"),
    "not-gguf": (lambda w, s: _write(w / "m.gguf", b"PK\3\4" * 10), "GGUF"),
    "hub-offline": (lambda w, s: "nobody/no-such-model", "hub"),
}
NEEDS_CONFIG = {"no-config": (lambda w, s: _copy_weights(w, s, False), "has no config.json")}


def _commands(model, work: Path, plan: Path) -> dict:
    return {
        "analyze": ["analyze", model],
        "calibrate": ["calibrate", model, "--tokens", "64", "--seqlen", "32"],
        "plan-show": ["plan", "show", plan, "--model", model],
        "plan-auto": ["plan", "auto", model, "--method", "lowrank", "--target-params", "0.5"]
        + ["-o", work / "auto.yaml"],
        "apply": ["apply", plan, "--model", model, "-o", work / "out"],
        "eval": ["eval", model, "--seqlen", "16", "--max-tokens", "32"],
        "app": ["app", model, "--port", str(_free_port())],
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


COMMANDS = ("analyze", "calibrate", "plan-show", "plan-auto", "apply", "eval", "app")
CASES = [(c, m) for c in COMMANDS for m in MODELS] + [
    (c, m) for c in ("calibrate", "apply", "eval") for m in NEEDS_CONFIG
]


@pytest.mark.parametrize(("command", "case"), CASES)
def test_every_command_refuses_a_bad_model(command, case, tmp_path, tiny_llama_dir, capsys, cli):
    work = tmp_path / "work"
    work.mkdir()
    plan = tmp_path / "plan.yaml"
    plan.write_text("rules:\n  - targets: ['re:.*mlp\\..*']\n    method: lowrank\n    rank: 4\n")
    make, needle = {**MODELS, **NEEDS_CONFIG}[case]
    model = make(work, tiny_llama_dir)
    inputs = sorted(p.relative_to(work) for p in work.rglob("*"))
    source = sorted((p.name, p.stat().st_mtime_ns) for p in tiny_llama_dir.iterdir())
    argv = _commands(str(model), work, plan)[command]
    if command == "app":  # a real process: a wrong pass would exec the server here
        r = cli(*argv, timeout=120)
        code, err = r.returncode, r.stderr
    else:
        code = main([str(a) for a in argv])
        err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("spectra: error:"), err
    assert needle in lines[0], lines[0]
    if case != "hub-offline":
        assert "hub" not in lines[0]  # a path is never reported as a hub failure
    assert sorted(p.relative_to(work) for p in work.rglob("*")) == inputs  # nothing written
    assert sorted((p.name, p.stat().st_mtime_ns) for p in tiny_llama_dir.iterdir()) == source
