"""The background analysis: the same rows as `analyze`, stored one by one, resumed,
stopped by a replaced checkpoint without keeping anything half-written."""

import shutil

from spectra import analysis as an
from spectra import rows as rowlib
from spectra.background import AnalysisJob, order
from spectra.io import cache
from spectra.io.model import open_model
from spectra.rows import AnalysisSettings


def finished(model, settings=None) -> AnalysisJob:
    job = AnalysisJob(model, settings).start()
    assert job.wait(120)
    return job


def test_the_job_gives_analyze_s_table_and_stores_it(tiny_llama_dir):
    job = finished(open_model(str(tiny_llama_dir)))
    p = job.progress()
    assert p["error"] is None and p["done"] == p["total"] == 16 and p["computed"] == 16
    ref = an.analyze(open_model(str(tiny_llama_dir)), with_mpo=False, use_cache=False)
    assert job.table().equals(ref)  # float for float
    info: dict = {}
    hit = an.analyze(open_model(str(tiny_llama_dir)), with_mpo=False, info=info)
    assert info["cached"] and hit.equals(ref)  # `spectra analyze --no-mpo` reads its table
    assert set(job.sigmas()) == set(ref["name"])


def test_rows_are_stored_and_read_back_one_by_one(tiny_llama_dir, monkeypatch):
    model = open_model(str(tiny_llama_dir))
    ref = finished(model).table()
    for p in (cache.cache_dir() / "analysis").glob("*.parquet"):
        p.unlink()  # only the per-matrix rows are left
    for p in (cache.cache_dir() / "hashes").glob("*.json"):
        if not p.name.startswith("partial-"):
            p.unlink()  # and the hashes of the rows done (as after an interruption)

    def fail(*a, **k):
        raise AssertionError("recomputed a stored row")

    monkeypatch.setattr(rowlib, "singular_values", fail)
    monkeypatch.setattr(rowlib, "singular_values_streamed", fail)
    again = finished(open_model(str(tiny_llama_dir)))
    p = again.progress()
    assert p["error"] is None and p["cached"] == 16 and p["computed"] == 0
    assert again.table().equals(ref)
    # `analyze` reads the stored rows too once the hashes are known
    (next((cache.cache_dir() / "analysis").glob("*.parquet"))).unlink()
    assert an.analyze(open_model(str(tiny_llama_dir)), with_mpo=False).equals(ref)


def test_an_interrupted_job_resumes_where_it_stopped(tiny_llama_dir, monkeypatch):
    model = open_model(str(tiny_llama_dir))
    job = AnalysisJob(model)
    done = order(model.matrices, 2)[:5]
    for m in done:  # what a job had finished when the app stopped
        job._one(m)
    computed = []
    real = rowlib.matrix_row
    monkeypatch.setattr(rowlib, "matrix_row", lambda *a: computed.append(1) or real(*a))
    again = finished(open_model(str(tiny_llama_dir)))
    assert again.progress()["cached"] == 5 and len(computed) == 11
    ref = an.analyze(open_model(str(tiny_llama_dir)), with_mpo=False, use_cache=False)
    assert again.table().equals(ref)


def test_mpo_rows_on_demand_equal_the_table_s(tiny_llama_dir):
    settings = AnalysisSettings(cores=3)
    job = AnalysisJob(open_model(str(tiny_llama_dir)), settings)  # not started
    row = job.row("model.layers.1.mlp.down_proj")
    ref = an.analyze(open_model(str(tiny_llama_dir)), use_cache=False)
    want = ref.filter(ref["name"] == "model.layers.1.mlp.down_proj").to_dicts()[0]
    assert row["bond_spectra"] == want["bond_spectra"] and row["sigma"] == want["sigma"]
    assert row["shape_m"] == 64 and row["block"] == 1


def test_bond_profiles_reuse_the_stored_spectra_and_equal_analyze_s(tiny_llama_dir, monkeypatch):
    finished(open_model(str(tiny_llama_dir)))  # the spectra first, as the app does
    calls = []
    real = rowlib.singular_values
    monkeypatch.setattr(rowlib, "singular_values", lambda w: calls.append(w.shape) or real(w))
    job = finished(open_model(str(tiny_llama_dir)), AnalysisSettings(cores=3))
    assert job.progress()["error"] is None and calls == []
    ref = an.analyze(open_model(str(tiny_llama_dir)), use_cache=False)
    assert job.table().equals(ref)


def test_a_job_on_lease_waits_while_nobody_looks(tiny_llama_dir):
    import time

    job = AnalysisJob(open_model(str(tiny_llama_dir)), lease=0.2)
    time.sleep(0.4)  # the page that wanted it is gone
    job.start()
    assert not job.wait(1.5) and job.progress()["done"] == 0
    end = time.monotonic() + 60
    while not job.finished and time.monotonic() < end:
        job.touch()  # a page that draws it, every so often
        time.sleep(0.05)
    assert job.finished and job.progress()["done"] == 16


def test_a_replaced_checkpoint_stops_the_job_and_keeps_nothing(tiny_llama_dir, tmp_path):
    from conftest import save_tiny_llama

    d = tmp_path / "m"
    shutil.copytree(tiny_llama_dir, d)
    job = AnalysisJob(open_model(str(d)))  # opened, then the directory is replaced
    shutil.rmtree(d)
    save_tiny_llama(d, intermediate_size=96)
    job.start()
    assert job.wait(60)
    assert "replaced" in job.progress()["error"]
    assert not list((cache.cache_dir() / "rows").rglob("*.json"))
    assert not (cache.cache_dir() / "analysis").exists()


def test_blocks_fill_in_in_order_and_the_big_ones_start_in_time(tiny_llama_dir):
    from spectra.background import cost

    mats = open_model(str(tiny_llama_dir)).matrices
    for workers in (1, 2, 8):
        queue = order(mats, workers)
        assert sorted(m.name for m in queue) == sorted(m.name for m in mats)
        blocks = [m.block for m in queue if m.block is not None]
        assert blocks == sorted(blocks)
        for i, m in enumerate(queue):
            if m.block is None:  # the work after it keeps the other workers busy, no more
                after = sum(cost(x) for x in queue[i + 1 :] if x.block is not None)
                assert after <= max((workers - 1) * cost(m), 0) or i == 0
    assert order(mats, 1)[-2:][0].block is None  # one worker: the big ones last
