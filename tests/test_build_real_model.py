"""`mifa build` as a user runs it: the CLI, a real local Ray, the real (tiny) MAUGen; determinism and resume."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.outputs import digests  # (the card and run manifest name the folder: left out)

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent
SMALL = ["--set", "identities.count=3", "--set", "identities.samples_per_identity=2", "--set", "sampler.steps=3",
         "--set", "writer.samples_per_shard=2", "--no-progress",
         "--set", "filter.face.detector=none", "--set", "filter.identity.embedder=none", "--set", "filter.au.estimator=none"]


def mifa(*args, **kwargs):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
    return subprocess.run([sys.executable, "-m", "mifa_pipeline.cli", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600, **kwargs)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "a"
    result = mifa("build", "manifests/demo.yaml", "--out", str(out), *SMALL,
                  "--set", "sampler.batch_size=1", "--set", "resources.identities_per_unit=1")
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_real_model_build_is_byte_identical_across_batch_unit_and_worker_counts(reference, tmp_path):
    out = tmp_path / "b"
    result = mifa("build", "manifests/demo.yaml", "--out", str(out), *SMALL, "--set", "sampler.batch_size=4",
                  "--set", "resources.identities_per_unit=3", "--set", "resources.generation_workers=2",
                  "--set", "resources.cpus_per_worker=0.5")
    assert result.returncode == 0, result.stderr[-3000:]
    assert digests(out) == digests(reference)
    assert mifa("verify", str(out)).returncode == 0


def test_sigkill_mid_build_then_resume_is_byte_identical(reference, tmp_path):
    out = tmp_path / "c"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
    args = [sys.executable, "-m", "mifa_pipeline.cli", "build", "manifests/demo.yaml", "--out", str(out), *SMALL,
            "--set", "resources.identities_per_unit=1", "--runner", "local"]
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    done = out / "_work" / "done"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if done.is_dir() and any(done.glob("train-*.json")):
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the build finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists()
    result = mifa("build", "manifests/demo.yaml", "--out", str(out), *SMALL, "--set", "resources.identities_per_unit=1")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed" in result.stdout
    assert digests(out) == digests(reference)
