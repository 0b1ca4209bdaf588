"""The analysis table, the cache and the batched (CUDA-style) path."""

import os
import shutil
import time

import numpy as np
import polars as pl
import pytest
import scipy.linalg
from safetensors.numpy import load_file, save_file

from spectra import analysis as an
from spectra import rows as rowlib
from spectra.io import cache
from spectra.io.model import open_model


def copy_model(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_table_has_every_design_column(tiny_llama_dir):
    df = an.analyze(open_model(str(tiny_llama_dir)))
    for col in [
        "shape_m",
        "shape_n",
        "role",
        "block",
        "sigma_max",
        "fro_norm",
        "nuclear_norm",
        "stable_rank",
        "erank",
        "energy_rank_90",
        "energy_rank_99",
        "participation_ratio",
        "alpha",
        "alpha_xmin",
        "alpha_ks",
        "sigma",
        "bond_spectra",
        "bond_entropy",
        "bond_chi",
        "bond_dims",
    ]:
        assert col in df.columns
    assert df.height == 16
    row = df.filter(pl.col("name") == "model.layers.1.mlp.up_proj").row(0, named=True)
    w = load_file(tiny_llama_dir / "model.safetensors")["model.layers.1.mlp.up_proj.weight"]
    np.testing.assert_allclose(row["sigma"], scipy.linalg.svdvals(w.astype(np.float64)), rtol=1e-9)
    assert (row["shape_m"], row["shape_n"]) == (96, 64)
    assert df["name"][0] == "model.embed_tokens" and df["name"][-1] == "lm_head"


def test_cache_hit_returns_identical_values(tiny_llama_dir):
    info = {}
    first = an.analyze(open_model(str(tiny_llama_dir)), info=info)
    assert info["cached"] is False
    again = an.analyze(open_model(str(tiny_llama_dir)), info=info)
    assert info["cached"] is True
    assert again.equals(first)


def test_changing_one_weight_forces_recomputation(tiny_llama_dir, tmp_path):
    model = copy_model(tiny_llama_dir, tmp_path / "m")
    before = an.analyze(open_model(str(model)))
    path = model / "model.safetensors"
    tensors = load_file(path)
    tensors["model.layers.0.self_attn.q_proj.weight"][3, 5] += 1.0
    time.sleep(0.01)
    save_file(tensors, path, metadata={"format": "pt"})
    info = {}
    after = an.analyze(open_model(str(model)), info=info)
    assert info["cached"] is False
    changed = after.filter(pl.col("name") == "model.layers.0.self_attn.q_proj")["sigma"][0]
    old = before.filter(pl.col("name") == "model.layers.0.self_attn.q_proj")["sigma"][0]
    assert not np.allclose(changed.to_numpy(), old.to_numpy())
    w = tensors["model.layers.0.self_attn.q_proj.weight"].astype(np.float64)
    np.testing.assert_allclose(changed.to_numpy(), scipy.linalg.svdvals(w), rtol=1e-9)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_cache_file_is_recomputed(tiny_llama_dir, isolated_cache, damage):
    good = an.analyze(open_model(str(tiny_llama_dir)))
    (table,) = (isolated_cache / "analysis").glob("*.parquet")
    data = table.read_bytes()
    table.write_bytes(
        {"truncate": data[: len(data) // 3], "garbage": os.urandom(len(data)), "empty": b""}[damage]
    )
    info = {}
    again = an.analyze(open_model(str(tiny_llama_dir)), info=info)
    assert info["cached"] is False and again.equals(good)
    assert pl.read_parquet(table).equals(good)  # rewritten whole


def test_corrupt_hash_memo_is_recomputed(tiny_llama_dir, isolated_cache):
    good = an.analyze(open_model(str(tiny_llama_dir)))
    for memo in (isolated_cache / "hashes").glob("*.json"):
        memo.write_text('{"stamp": [1, 2')
    assert an.analyze(open_model(str(tiny_llama_dir))).equals(good)


def test_no_temporary_files_left(tiny_llama_dir, isolated_cache):
    an.analyze(open_model(str(tiny_llama_dir)))
    leftovers = [p for p in isolated_cache.rglob("*") if p.name.endswith(".tmp")]
    assert leftovers == []


def test_tied_weights_are_analysed_once(tmp_path):
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((50, 16)).astype(np.float32)
    save_file(
        {
            "model.embed_tokens.weight": emb,
            "lm_head.weight": emb.copy(),
            "model.layers.0.mlp.up_proj.weight": rng.standard_normal((24, 16)).astype(np.float32),
        },
        tmp_path / "model.safetensors",
    )
    df = an.analyze(open_model(str(tmp_path)))
    assert df.height == 2
    assert df.filter(pl.col("name") == "model.embed_tokens")["aliases"][0].to_list() == ["lm_head"]


def test_settings_change_the_key(tiny_llama_dir):
    a = an.analyze(open_model(str(tiny_llama_dir)), cores=2)
    b = an.analyze(open_model(str(tiny_llama_dir)), cores=4)
    assert a["mpo_cores"].unique().to_list() == [2] and b["mpo_cores"].unique().to_list() == [4]


def test_batched_torch_path_agrees_with_cpu_path(tiny_llama_dir):

    mats = open_model(str(tiny_llama_dir)).matrices
    settings = an.AnalysisSettings(cores=3)
    cpu = an._run_cpu(mats, settings, "cpu", None)
    batched = an._run_cuda(mats, settings, "cpu", None)  # same code as on CUDA, on the CPU
    for a, b in zip(cpu, batched, strict=True):
        np.testing.assert_allclose(a["sigma"], b["sigma"], rtol=1e-9, atol=1e-12)
        for sa, sb in zip(a["bond_spectra"], b["bond_spectra"], strict=True):
            np.testing.assert_allclose(sa, sb, rtol=1e-8, atol=1e-10)
        assert a["alpha"] == pytest.approx(b["alpha"], rel=1e-8, nan_ok=True)
        assert a["bond_chi"] == b["bond_chi"]


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs CUDA")
def test_cuda_agrees_with_cpu(tiny_llama_dir):
    cpu = an.analyze(open_model(str(tiny_llama_dir), "cpu"), use_cache=False)
    gpu = an.analyze(open_model(str(tiny_llama_dir), "cuda"), use_cache=False)
    for a, b in zip(cpu["sigma"], gpu["sigma"], strict=True):
        np.testing.assert_allclose(a.to_numpy(), b.to_numpy(), rtol=1e-6)


def test_cache_dir_resolution(monkeypatch, tmp_path):
    monkeypatch.setenv("SPECTRA_CACHE", str(tmp_path / "x"))
    assert cache.cache_dir() == tmp_path / "x"
    monkeypatch.delenv("SPECTRA_CACHE")
    assert cache.cache_dir().name == "cache"  # running from the checkout


@pytest.mark.demo
def test_demo_analysis(demo_dir):
    info = {}
    df = an.analyze(open_model("demo"), info=info)
    assert df.height == 211 and info["matrices"] == 211
    q0 = df.filter(pl.col("name") == "model.layers.0.self_attn.q_proj").row(0, named=True)
    assert 1 <= q0["energy_rank_90"] <= 576 and q0["alpha"] > 1
    assert q0["bond_dims"] == [64, 81] and len(q0["sigma"]) == 576


def test_without_mpo_the_profile_columns_are_null_and_spectra_equal(tiny_llama_dir):
    full = an.analyze(open_model(str(tiny_llama_dir)))
    lean = an.analyze(open_model(str(tiny_llama_dir)), with_mpo=False)
    assert lean["bond_spectra"].null_count() == lean.height
    assert full["bond_spectra"].null_count() == 0
    assert lean.select("name", "sigma", "alpha").equals(full.select("name", "sigma", "alpha"))


def test_progress_reports_every_matrix(tiny_llama_dir):
    calls = []
    an.analyze(
        open_model(str(tiny_llama_dir)), use_cache=False, progress=lambda *a: calls.append(a)
    )
    assert [c[0] for c in calls] == list(range(1, 17))
    assert {c[1] for c in calls} == {16} and all(isinstance(c[2], str) for c in calls)


def test_streamed_gram_of_a_large_tall_matrix_matches_the_whole(tmp_path, monkeypatch):
    rng = np.random.default_rng(4)
    big = rng.standard_normal((3000, 40)).astype(np.float32)
    save_file({"model.embed_tokens.weight": big}, tmp_path / "model.safetensors")
    monkeypatch.setattr(rowlib, "STREAM_MIN_BYTES", 1)  # stream it
    monkeypatch.setattr(rowlib, "STREAM_CHUNK_BYTES", 7 * 40 * 8)  # in blocks of 7 rows
    called = []
    real = rowlib.singular_values_streamed
    monkeypatch.setattr(rowlib, "singular_values_streamed", lambda c: called.append(1) or real(c))
    lean = an.analyze(open_model(str(tmp_path)), with_mpo=False, use_cache=False)
    assert called
    ref = scipy.linalg.svdvals(big.astype(np.float64))
    np.testing.assert_allclose(lean["sigma"][0].to_numpy(), ref, rtol=1e-10)
    full = an.analyze(open_model(str(tmp_path)), use_cache=False)
    assert lean["content_hash"][0] == full["content_hash"][0]


def test_streamed_falls_back_to_svd_when_ill_conditioned(tmp_path, monkeypatch):
    rng = np.random.default_rng(5)
    low = (rng.standard_normal((500, 3)) @ rng.standard_normal((3, 20))).astype(np.float32)
    save_file({"model.embed_tokens.weight": low}, tmp_path / "model.safetensors")
    monkeypatch.setattr(rowlib, "STREAM_MIN_BYTES", 1)
    df = an.analyze(open_model(str(tmp_path)), with_mpo=False, use_cache=False)
    s = df["sigma"][0].to_numpy()
    ref = scipy.linalg.svdvals(low.astype(np.float64))
    np.testing.assert_allclose(s[:3], ref[:3], rtol=1e-6)
    assert np.all(s[3:] < 1e-5 * s[0])


def test_spectra_by_name_reads_whichever_analysis_is_cached(tiny_llama_dir):
    from spectra.analysis import analyze, spectra_by_name

    assert analyze(open_model(str(tiny_llama_dir)), cached_only=True) is None  # nothing computed
    info: dict = {}
    full = analyze(open_model(str(tiny_llama_dir)), info=info)
    assert not info["cached"]
    sigmas = spectra_by_name(open_model(str(tiny_llama_dir)))
    assert sigmas == {r["name"]: r["sigma"] for r in full.to_dicts()}
    hit = analyze(open_model(str(tiny_llama_dir)), with_mpo=False, cached_only=True)
    assert hit is None  # served from the default analysis, no spectra-only table written


def test_transposed_conv1d_rows_equal_the_out_by_in_matrix(tiny_gpt2_dir, monkeypatch):
    """GPT-2 Conv1D weights are analysed as (out, in) strided views, block by block."""
    from spectra.linalg import mpo, svd

    monkeypatch.setattr(svd, "CHUNK_BYTES", 8 * 200)
    monkeypatch.setattr(mpo, "CHUNK_BYTES", 8 * 200)
    df = an.analyze(open_model(str(tiny_gpt2_dir)), use_cache=False)
    row = df.filter(pl.col("name") == "transformer.h.1.mlp.c_fc").row(0, named=True)
    w = load_file(tiny_gpt2_dir / "model.safetensors")["transformer.h.1.mlp.c_fc.weight"]
    w = np.ascontiguousarray(w.T, dtype=np.float64)  # stored (in, out): 32 x 128
    assert (row["shape_m"], row["shape_n"]) == w.shape == (128, 32)
    np.testing.assert_allclose(row["sigma"], scipy.linalg.svdvals(w), rtol=1e-10)
    mf, nf = tuple(row["mpo_m"]), tuple(row["mpo_n"])
    for k, got in enumerate(row["bond_spectra"], 1):
        ml, nl = int(np.prod(mf[:k])), int(np.prod(nf[:k]))
        u = w.reshape(ml, 128 // ml, nl, 32 // nl).transpose(0, 2, 1, 3).reshape(ml * nl, -1)
        np.testing.assert_allclose(got, scipy.linalg.svdvals(u), rtol=1e-9, atol=1e-12)
