"""`--ray` on the command line: a local cluster started by the command, and refusals."""

import pytest
import yaml

pytest.importorskip("ray")

PLAN = {
    "version": 1,
    "rules": [
        {"targets": [r"re:model\.layers\.\d+\.mlp\..*"], "method": "lowrank", "rank": 6},
        {"targets": [r"re:model\.layers\.\d+\.self_attn\.[qk]_proj"], "method": "joint", "rank": 4},
    ],
}
NO_CLUSTER = {"RAY_ADDRESS": ""}  # `auto` starts a local cluster of its own


def test_analyze_and_apply_with_ray_equal_the_local_path(family_dir, tmp_path, cli):
    import polars as pl
    from safetensors.torch import load_file

    path = family_dir("llama")
    r = cli("analyze", path, "--no-cache", "--out", tmp_path / "local.parquet")
    assert r.returncode == 0, r.stderr
    r = cli(
        "analyze", path, "--no-cache", "--ray", "--out", tmp_path / "ray.parquet", env=NO_CLUSTER
    )
    assert r.returncode == 0, r.stderr
    assert "(ray auto)" in r.stdout
    assert pl.read_parquet(tmp_path / "ray.parquet").equals(
        pl.read_parquet(tmp_path / "local.parquet")
    )

    plan = tmp_path / "plan.yaml"
    plan.write_text(yaml.safe_dump(PLAN))
    for name, extra in (("local", []), ("ray", ["--ray", "auto"])):
        r = cli("apply", plan, "--model", path, "-o", tmp_path / name, *extra, env=NO_CLUSTER)
        assert r.returncode == 0, r.stderr
    for part in ("dense.safetensors", "factors.safetensors"):
        local = load_file(tmp_path / "local" / part)
        remote = load_file(tmp_path / "ray" / part)
        assert local.keys() == remote.keys() and len(local) > 0
        assert all(local[k].equal(remote[k]) for k in local), part


@pytest.mark.parametrize("command", ["analyze", "apply", "calibrate"])
def test_an_unreachable_cluster_is_one_line_and_exit_2(family_dir, tmp_path, cli, command):
    path = family_dir("llama")
    out = tmp_path / ("out.parquet" if command == "analyze" else "out")
    plan = tmp_path / "plan.yaml"
    plan.write_text(yaml.safe_dump(PLAN))
    args = {
        "analyze": ["analyze", path, "--no-cache", "--out", out],
        "apply": ["apply", plan, "--model", path, "-o", out],
        "calibrate": ["calibrate", path, "--tokens", "256", "--seqlen", "32", "--no-cache"],
    }[command]
    env = {"SPECTRA_CACHE": str(tmp_path / "cache")}
    r = cli(*args, "--ray", "127.0.0.1:1", env=env)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "cannot reach a Ray cluster" in r.stderr
    assert not out.exists()
    calibrations = tmp_path / "cache" / "calibration"
    assert not calibrations.exists() or not list(calibrations.iterdir())  # nothing half-written


def test_ray_without_the_extra_says_how_to_install_it(family_dir, tmp_path, cli):
    fake = tmp_path / "site" / "ray"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text('raise ImportError("No module named ray")\n')
    out = tmp_path / "table.parquet"
    r = cli(
        "analyze", family_dir("llama"), "--out", out, "--ray", env={"PYTHONPATH": str(fake.parent)}
    )
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0
    assert 'pip install -e ".[distributed]"' in r.stderr
    assert not out.exists()
