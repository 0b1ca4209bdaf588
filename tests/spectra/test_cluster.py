"""`--ray`: analysis and apply on a real local Ray cluster equal the local path."""

import os
from pathlib import Path

import pytest
import torch
import yaml

ray = pytest.importorskip("ray")

from spectra.analysis import AnalysisSettings, analyze, matrix_task  # noqa: E402
from spectra.io.model import open_model  # noqa: E402
from spectra.linalg import cluster  # noqa: E402
from spectra.plan import run  # noqa: E402


@pytest.fixture(scope="module")
def ray_cluster():
    """One local cluster (2 CPUs) for the module, as `ray.init(num_cpus=2)` starts it."""
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    yield
    ray.shutdown()


@pytest.mark.parametrize("family", ["llama", "gpt2"])  # gpt2: Conv1D weights, stored (in, out)
def test_analysis_on_ray_equals_local(ray_cluster, family_dir, family):
    path = family_dir(family)
    local = analyze(open_model(str(path), "cpu"), use_cache=False)
    info: dict = {}
    remote = analyze(open_model(str(path)), use_cache=False, ray="auto", info=info)
    assert info["device"] == "ray auto"
    assert remote.equals(local)  # float64 numerics, bit for bit
    assert remote.height == len(open_model(str(path)).matrices)


def _plan(tmp_path, rules):
    p = tmp_path / "plan.yaml"
    p.write_text(yaml.safe_dump({"version": 1, "rules": rules}))
    from spectra.plan import format as plans

    return plans.load(p)


def _compressed_state(model, plan, mapper, grams=None):

    out, reports, _ = run.apply_plan(model, plan, grams=grams, mapper=mapper)
    return {k: v.clone() for k, v in out.state_dict().items()}, reports


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_data_free_apply_on_ray_equals_local(ray_cluster, family_dir, family, tmp_path):
    path = family_dir(family)
    model = open_model(str(path), "cpu", "float32", "none").load()
    rules = [
        {"targets": [r"re:.*\.mlp\..*"], "method": "lowrank", "rank": 6},
        {"targets": [r"re:.*(q_proj|k_proj|c_attn)"], "method": "mpo", "bond_dim": 4},
        {"targets": [r"re:.*(v_proj|o_proj|attn\.c_proj)"], "method": "quant", "bits": 4},
    ]
    plan = _plan(tmp_path, rules)
    local, local_reports = _compressed_state(model, plan, None)
    remote, remote_reports = _compressed_state(model, plan, cluster.task_map)
    assert len(remote_reports) == len(local_reports) > 4
    assert local.keys() == remote.keys()
    for k in local:
        assert torch.equal(local[k], remote[k]), k
    assert [r.rel_error for r in remote_reports] == [r.rel_error for r in local_reports]


def test_data_aware_apply_on_ray_equals_local(ray_cluster, family_dir, tmp_path):
    from compressors.activations import collect

    path = family_dir("llama")
    model = open_model(str(path), "cpu", "float32", "none").load()
    ids = torch.randint(
        0, model.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0)
    )
    grams = collect(model, ids)
    rules = [
        {"targets": [r"re:.*mlp.*"], "method": "lowrank", "rank": 6, "whiten": True},
        {"targets": [r"re:.*self_attn.*"], "method": "quant", "bits": 3, "gptq": True},
    ]
    plan = _plan(tmp_path, rules)
    local, _ = _compressed_state(model, plan, None, grams)
    remote, _ = _compressed_state(model, plan, cluster.task_map, grams)
    for k in local:
        assert torch.equal(local[k], remote[k]), k


def _die_once(marker_dir: str):
    """matrix_task, except that the first attempt at the third matrix kills its worker."""

    def task(job):
        m = job[0]
        marker = Path(marker_dir) / "died"
        if m.name == job[3] and not marker.exists():
            marker.write_text(str(os.getpid()))
            os._exit(1)  # the worker process dies mid-task, as on a lost node
        return matrix_task(job[:3])

    return task


def test_a_killed_worker_is_retried_and_the_result_is_complete(ray_cluster, family_dir, tmp_path):
    path = family_dir("llama")
    mats = open_model(str(path)).matrices
    settings = AnalysisSettings()
    victim = mats[2].name
    jobs = [(m, settings, "cpu", victim) for m in mats]
    rows = list(cluster.task_map(_die_once(str(tmp_path)), jobs, names=lambda j: j[0].name))
    assert (tmp_path / "died").exists()  # the worker did die once
    for m, (row, hashes) in zip(mats, rows, strict=True):
        want, _ = matrix_task((m, settings, "cpu"))
        assert row == want, m.name
        assert m.ref.name in hashes


def test_a_task_that_fails_for_good_names_its_job(ray_cluster):
    def fail_on_three(x):
        if x == 3:
            raise ValueError("no such rank")
        return x

    with pytest.raises(cluster.TaskFailed, match=r"job-3: ValueError: no such rank"):
        list(cluster.task_map(fail_on_three, range(6), names=lambda x: f"job-{x}"))
    assert list(cluster.task_map(lambda x: x * x, range(5))) == [0, 1, 4, 9, 16]


def test_calibration_sharded_on_ray_equals_local(ray_cluster, family_dir):
    """Windows split into shards, one task each, Grams streamed block by block and
    summed: the Grams of the local pass (exactly: each shard's float32 products add up
    in float64 without rounding here), the shared ones still shared."""
    from spectra.data.calibration import CalibrationSpec, calibrate

    path = str(family_dir("llama"))
    settings = CalibrationSpec(samples=12, seqlen=32)  # 3 batches of 4 windows: 2 shards
    local = calibrate(open_model(path, "cpu"), settings, use_cache=False)
    info: dict = {}
    remote = calibrate(open_model(path), settings, use_cache=False, ray="auto", info=info)
    assert info["cached"] is False
    assert local.blocks == remote.blocks and len(local.blocks) == 2
    for block in local.blocks:
        mine, theirs = local[block], remote[block]
        assert mine.keys() == theirs.keys()
        for name, (h, rows) in mine.items():
            assert rows == theirs[name][1] == 12 * 32
            assert torch.equal(h, theirs[name][0]), name
        shared = lambda grams: {n: id(h) for n, (h, _) in grams.items()}  # noqa: E731
        assert len(set(shared(mine).values())) == len(set(shared(theirs).values()))
