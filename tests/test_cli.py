"""The command line: outputs, and bad input -> exit 2 with one line, nothing written."""

import json

import polars as pl
import pytest

from spectra.cli import main


@pytest.mark.parametrize("suffix", [".parquet", ".csv", ".json"])
def test_analyze_writes_the_full_table(tiny_llama_dir, tmp_path, suffix, capsys):
    out = tmp_path / f"table{suffix}"
    assert main(["analyze", str(tiny_llama_dir), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "16 matrices" in printed and "by role" in printed and "by block" in printed
    df = {".parquet": pl.read_parquet, ".csv": pl.read_csv, ".json": pl.read_json}[suffix](out)
    assert df.height == 16 and "alpha" in df.columns and "sigma" in df.columns
    if suffix == ".csv":
        sigma = json.loads(df["sigma"][0])
        assert len(sigma) == 64
    assert [p for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_analyze_json_on_stdout(tiny_llama_dir, capsys):
    assert main(["analyze", str(tiny_llama_dir), "--json", "--cores", "2"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["matrices"] == 16 and data["cores"] == 2 and len(data["rows"]) == 16
    roles = {r["role"]: r for r in data["by_role"]}
    assert roles["q"]["n"] == 2 and roles["q"]["erank"] > 1
    assert "sigma" not in data["rows"][0]  # spectra go to --out, not stdout


def test_second_run_is_served_from_cache(tiny_llama_dir, capsys):
    main(["analyze", str(tiny_llama_dir), "--json"])
    first = json.loads(capsys.readouterr().out)
    main(["analyze", str(tiny_llama_dir), "--json"])
    second = json.loads(capsys.readouterr().out)
    assert first["source"] == "cpu" and second["source"] == "cache"
    assert first["rows"] == second["rows"]


BAD = {
    "cores-1": (lambda p, s: ["analyze", s, "--cores", "1"], "cores=1"),
    "cores-9": (lambda p, s: ["analyze", s, "--cores", "9"], "cores=9"),
    "out-unwritable": (lambda p, s: ["analyze", s, "--out", "/proc/table.parquet"], "not writable"),
    "out-no-dir": (lambda p, s: ["analyze", s, "--out", p / "no" / "t.parquet"], "does not exist"),
    "out-bad-format": (lambda p, s: ["analyze", s, "--out", p / "t.xlsx"], "unsupported format"),
    "cuda-absent": (lambda p, s: ["analyze", s, "--device", "cuda"], "CUDA"),
    "unknown-option": (lambda p, s: ["analyze", s, "--frobnicate"], "unrecognized"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_exits_2_with_one_line(case, tmp_path, tiny_llama_dir, cli):
    if case == "cuda-absent" and __import__("torch").cuda.is_available():
        pytest.skip("a CUDA device is present")
    make, needle = BAD[case]
    work = tmp_path / "work"
    work.mkdir()
    before = sorted(p.name for p in tiny_llama_dir.iterdir())
    r = cli(*make(work, tiny_llama_dir))
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert needle in lines[0] and lines[0].startswith("spectra: error:")
    assert not list(work.rglob("*.parquet")) and not list(work.rglob("t.*"))
    assert sorted(p.name for p in tiny_llama_dir.iterdir()) == before  # source untouched


def test_subprocess_success_exit_code(tiny_llama_dir, tmp_path, cli):
    r = cli("analyze", tiny_llama_dir, "--out", tmp_path / "t.parquet")
    assert r.returncode == 0 and "analysed in" in r.stdout
    assert pl.read_parquet(tmp_path / "t.parquet").height == 16
