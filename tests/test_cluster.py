"""A simulated multi-node Ray cluster (ray.cluster_utils.Cluster: a head and two worker nodes with one fake GPU
each, so generation actors are placed by GPU) writing to a real S3 server: the same bytes as a local build,
also when a worker node is removed mid-build and when the driver is SIGKILLed and the build resumed."""

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from mifa_pipeline.config import load_manifest
from mifa_pipeline.runner import build_data, prepare
from mifa_pipeline.storage import Location
from mifa_pipeline.verify import verify
from tests.outputs import digests

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent

# The teacher renderer as generator, judges off: fast, and every node computes the same bytes.
SETS = ("model.checkpoint=teacher", "sampler.resolution=64", "identities.count=40",
        "identities.samples_per_identity=4", "writer.samples_per_shard=8", "resources.identities_per_unit=8",
        "filter.face.detector=none", "filter.identity.embedder=none", "filter.au.estimator=none",
        "resources.generation_workers=2", "resources.gpus_per_worker=1", "resources.cpus_per_worker=0.5",
        "resources.filter_cpus=0.25")
NODE = {"num_cpus": 1, "object_store_memory": 96 * 1024**2}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("reference") / "local"
    build_data(prepare(load_manifest(None, list(SETS), output=out)), "local", progress=False)
    return digests(out)


@pytest.fixture(scope="module")
def cluster(s3_server):
    """Head (CPU only) + two worker nodes with one fake GPU each; started after the S3 variables are set, so
    every node's workers inherit them, as a real cluster's nodes have their own credentials."""
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    c = Cluster(initialize_head=True, head_node_args={**NODE, "include_dashboard": False})
    nodes = [c.add_node(**NODE, num_gpus=1) for _ in range(2)]
    c.wait_for_nodes()
    yield c, nodes
    if ray.is_initialized():
        ray.shutdown()
    c.shutdown()


def _done_count(url: str) -> int:
    return len([n for n in Location(url).listdir("_work/done") if n.startswith("train-")])


def test_a_three_node_build_to_s3_is_the_local_build(cluster, s3_server, reference):
    c, _ = cluster
    url = s3_server.url(f"cluster-{time.monotonic_ns()}")
    result = build_data(prepare(load_manifest(None, list(SETS), output=url)), "ray", progress=False,
                        ray_address=c.address)
    assert result.state == "built" and digests(url) == reference and verify(url) == []
    assert result.manifest["driver_received_bytes_last_run"] < 2000 * len(result.manifest["shards"])


def test_a_node_removed_mid_build_still_gives_the_same_bytes(cluster, s3_server, reference):
    c, nodes = cluster
    url = s3_server.url(f"node-lost-{time.monotonic_ns()}")
    removed = []

    def remove_one_node():
        deadline = time.time() + 300
        while time.time() < deadline and _done_count(url) < 1:
            time.sleep(0.05)
        c.remove_node(nodes[1])
        removed.append(_done_count(url))

    killer = threading.Thread(target=remove_one_node, daemon=True)
    killer.start()
    result = build_data(prepare(load_manifest(None, list(SETS), output=url)), "ray", progress=False,
                        ray_address=c.address)
    killer.join(timeout=60)
    assert removed and removed[0] < len(result.manifest["shards"]), "the node left after the build ended"
    assert digests(url) == reference and verify(url) == []
    nodes[1] = c.add_node(**NODE, num_gpus=1)  # for the next test
    c.wait_for_nodes()


def test_a_killed_driver_resumes_to_the_same_bytes(cluster, s3_server, reference):
    c, _ = cluster
    url = s3_server.url(f"driver-killed-{time.monotonic_ns()}")
    args = [sys.executable, "-m", "mifa_pipeline.cli", "build", "--out", url, "--no-progress",
            "--ray-address", c.address, *[x for s in SETS for x in ("--set", s)]]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and _done_count(url) < 2:
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()[1][-2000:]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert Location(url).exists(".mifa-lock.json") and not Location(url).exists("manifest.json")
    again = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "resumed" in again.stdout, again.stderr[-3000:]
    assert "took over the lock of a dead run" in again.stderr + again.stdout
    assert digests(url) == reference and verify(url) == []
