"""Whole builds through Ray: the same bytes as the local runner, whatever the worker count; standard readers."""

from pathlib import Path

import pytest

from mifa_pipeline.runner import BuildError, build_data, prepare
from mifa_pipeline.verify import verify
from tests.outputs import digests

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_fake_cluster():
    """A 2-CPU local Ray whose workers use the fake model (see tests/fake_model.install_in_worker)."""
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             object_store_memory=256 * 1024**2,
             runtime_env={"worker_process_setup_hook": "tests.fake_model.install_in_worker",
                          "env_vars": {"PYTHONPATH": str(Path(__file__).resolve().parent.parent)}})
    yield
    ray.shutdown()


def ray_build(manifest):
    return build_data(prepare(manifest), "ray", progress=False)


def test_ray_build_equals_local_build_for_any_worker_count(ray_fake_cluster, small_manifest, fake_model, tmp_path):
    local = small_manifest("resources.identities_per_unit=1", out=tmp_path / "local")
    build_data(prepare(local), "local", progress=False)
    one = small_manifest("resources.cpus_per_worker=1", out=tmp_path / "one")
    two = small_manifest("resources.generation_workers=2", "resources.cpus_per_worker=0.5", "sampler.batch_size=1",
                         out=tmp_path / "two")
    assert ray_build(one).manifest["runner"] == "ray"
    ray_build(two)
    assert digests(one.output) == digests(local.output) == digests(two.output)
    assert verify(two.output) == []


def test_standard_readers_accept_the_output(ray_fake_cluster, small_manifest, fake_model, tmp_path):
    import webdataset as wds
    import wids

    m = small_manifest(out=tmp_path / "o")
    ray_build(m)
    tars = sorted(str(p) for p in Path(m.output).glob("*.tar"))
    ray_rows = ray.data.read_webdataset(tars).take_all()
    assert len(ray_rows) == 18 and {r["__key__"] for r in ray_rows} == {f"id{i:07d}-s{s:04d}" for i in range(6) for s in range(3)}
    row = next(r for r in ray_rows if r["__key__"] == "id0000002-s0001")
    assert row["json"]["identity"] == 2 and set(row["json"]["intensity"]) == set(row["json"]["requested_aus"])
    assert row["png"].shape == (32, 32, 3)
    indexed = wids.ShardListDataset(str(Path(m.output) / "shardindex.json"))
    assert len(indexed) == 18 and indexed[7][".json"]["key"] == "id0000002-s0001"
    streamed = list(wds.WebDataset(tars, shardshuffle=False).decode("rgb"))
    assert [s["__key__"] for s in streamed] == [r["json"]["key"] for r in sorted(ray_rows, key=lambda r: r["__key__"])]


def test_unschedulable_pool_is_refused_instead_of_hanging(ray_fake_cluster, small_manifest, fake_model, tmp_path):
    m = small_manifest("resources.generation_workers=2", "resources.cpus_per_worker=1", out=tmp_path / "o")
    with pytest.raises(BuildError, match="resources: 2 generation worker"):
        ray_build(m)


def test_refilter_on_ray_equals_local_and_keeps_the_parent(ray_fake_cluster, small_manifest, fake_model, tmp_path):
    import json

    import pyarrow.parquet as pq

    from mifa_pipeline.refilter import prepare_refilter, run_refilter

    parent = small_manifest(out=tmp_path / "v1")
    ray_build(parent)
    before = digests(Path(parent.output))
    stds = sorted(json.loads(r["scores"])["pixel_std"] for f in sorted((Path(parent.output) / "scores").glob("*.parquet"))
                  for r in pq.read_table(f, columns=["scores"]).to_pylist())
    sets = [f"filter.min_pixel_std={stds[len(stds) // 2]}"]  # the median contrast: about half kept
    on_ray = run_refilter(prepare_refilter(Path(parent.output), sets, tmp_path / "a" / "ray"), "ray", progress=False)
    local = run_refilter(prepare_refilter(Path(parent.output), sets, tmp_path / "b" / "local"), "local", progress=False)
    assert on_ray.manifest["parent"]["fingerprint"] == local.manifest["parent"]["fingerprint"]
    assert 0 < on_ray.manifest["counts"]["kept_samples"] < 18
    assert digests(tmp_path / "a" / "ray") == digests(tmp_path / "b" / "local")
    assert digests(Path(parent.output)) == before and verify(tmp_path / "a" / "ray") == []


def test_sigterm_stops_a_ray_build_cleanly_and_it_resumes(tmp_path):
    """ray.init makes SIGTERM exit the driver at once; mifa keeps its own handling: exit 130, one message,
    finished shards kept and the lock released, then the same command resumes."""
    import os
    import signal
    import subprocess
    import sys
    import time

    root = Path(__file__).resolve().parent.parent
    out = tmp_path / "o"
    args = [sys.executable, "-m", "mifa_pipeline.cli", "build", "--out", str(out), "--no-progress",
            *[x for s in ("model.checkpoint=teacher", "sampler.resolution=64", "identities.count=48",
                          "identities.samples_per_identity=8", "writer.samples_per_shard=32",
                          "filter.face.detector=none", "filter.identity.embedder=none", "filter.au.estimator=none")
              for x in ("--set", s)]]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "RAY_ADDRESS": ""}
    proc = subprocess.Popen(args, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and len(list(out.glob("_work/done/train-*.json"))) < 2:
        time.sleep(0.1)
    assert proc.poll() is None, proc.communicate()[1][-2000:]
    os.kill(proc.pid, signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "interrupted; finished work" in stderr, stderr[-2000:]
    assert not (out / ".mifa-lock.json").exists() and not (out / "manifest.json").exists()
    again = subprocess.run([*args, "--runner", "local"], cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "resumed" in again.stdout, again.stderr[-2000:]
    assert verify(out) == []
