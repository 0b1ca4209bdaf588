"""`spectra sensitivity`: the per-module table, cached; `--correlate` gives Spearman rho
values that scipy computes from the same table, overall and per role; bad input exits 2."""

import json
import warnings

import numpy as np
import polars as pl
import pytest
from scipy.stats import spearmanr


@pytest.fixture(scope="module")
def four_block_llama(tmp_path_factory):
    """A seeded 4-block Llama with the BOS tokenizer: four modules per role."""
    import torch
    from conftest import TINY_VOCAB, bos_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=TINY_VOCAB,
    )
    path = tmp_path_factory.mktemp("four-block-llama")
    LlamaForCausalLM(cfg).save_pretrained(path)
    bos_tokenizer(path)
    return path


def rho(x, y):
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    ok = np.isfinite(x) & np.isfinite(y)
    with warnings.catch_warnings():  # a constant side: NaN, said by a warning
        warnings.simplefilter("ignore")
        return spearmanr(x[ok], y[ok]).statistic


def test_correlate_json_matches_scipy_on_the_table(four_block_llama, tmp_path, cli):
    out = tmp_path / "sens.parquet"
    args = ("sensitivity", four_block_llama, "--tokens", "1024", "--correlate", "--json")
    r = cli(*args, "--out", out)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert got["kind"] == "fisher" and len(got["modules"]) == 4 * 7 + 1  # the LM head too
    table = pl.read_parquet(out)
    assert table.height == len(got["modules"])
    assert {"alpha", "farms_alpha", "stable_rank", "erank", "energy_rank_90"} <= {
        c["metric"] for c in got["correlation"]
    }
    rhos = [abs(c["rho"]) for c in got["correlation"]]
    assert rhos == sorted(rhos, reverse=True)  # ranked by |rho|
    for c in got["correlation"]:
        assert -1 <= c["rho"] <= 1
        assert c["rho"] == pytest.approx(rho(table[c["metric"]], table["score"]), abs=1e-9)
        for role, value in c["by_role"].items():
            part = table.filter(pl.col("role") == role)
            if part.height < 3:
                assert value is None  # the LM head alone has no rho
                continue
            expect = rho(part[c["metric"]], part["score"])
            if np.isnan(expect):  # a constant metric within the role
                assert value is None
            else:
                assert -1 <= value <= 1 and value == pytest.approx(expect, abs=1e-9)
    again = cli("sensitivity", four_block_llama, "--tokens", "1024", "--json")
    assert again.returncode == 0, again.stderr
    cached = json.loads(again.stdout)
    assert cached["cached"] and cached["modules"] == got["modules"]


def test_calib_kind_scores_every_module_and_adds_activation_aware_metrics(four_block_llama, cli):
    r = cli("sensitivity", four_block_llama, "--kind", "calib", "--tokens", "1024")
    assert r.returncode == 0, r.stderr
    r = cli(
        "sensitivity",
        four_block_llama,
        "--kind",
        "calib",
        "--tokens",
        "1024",
        "--correlate",
        "--json",
    )
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert all(m["score"] > 0 for m in got["modules"])
    assert "calib_erank" in {c["metric"] for c in got["correlation"]}
    assert got["cached"]


@pytest.mark.parametrize(
    "args,match",
    [
        (("--kind", "bogus"), "invalid choice: 'bogus'"),
        (("--out", "table.txt"), "unsupported format"),
        (("--tokens", "8"), "need at least one window"),
    ],
)
def test_bad_input_exits_2_with_one_line(four_block_llama, tmp_path, cli, args, match):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    r = cli(
        "sensitivity",
        four_block_llama,
        *[str(out_dir / a) if a.endswith(".txt") else a for a in args],
    )
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and match in lines[0], r.stderr
    assert not list(out_dir.iterdir())


def test_a_model_without_a_tokenizer_exits_2(tiny_llama_dir, tmp_path, cli):
    out = tmp_path / "s.parquet"
    r = cli("sensitivity", tiny_llama_dir, "--out", out)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "tokenizer" in lines[0], r.stderr
    assert not out.exists()
