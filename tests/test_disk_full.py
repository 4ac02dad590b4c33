"""A full disk mid-build: one clear line and a non-zero exit, then (with space again) a resume to the same bytes.

Uses a real small tmpfs (needs root, as in CI's container; skipped where mounting is not allowed).
"""

import hashlib
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mifa_pipeline.cli import app

SMALL = ["--set", "identities.count=12", "--set", "identities.samples_per_identity=3",
         "--set", "writer.samples_per_shard=4", "--set", "resources.identities_per_unit=4", "--set", "sampler.steps=2",
         "--set", "filter.face.detector=none", "--set", "filter.identity.embedder=none", "--set", "filter.au.estimator=none"]


def digests(folder: Path) -> dict[str, str]:
    names = sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                   if p.is_file() and not str(p.relative_to(folder)).startswith(("_work", "manifest.json")))
    return {n: hashlib.sha256((folder / n).read_bytes()).hexdigest() for n in names}


@pytest.fixture
def small_disk(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=160k", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


def build(out: Path):
    return CliRunner().invoke(app, ["build", "manifests/demo.yaml", "--out", str(out), "--runner", "local",
                                    "--no-progress", *SMALL])


def test_a_full_disk_is_one_clear_message_then_the_build_resumes_identically(small_disk, tmp_path, fake_model):
    reference = tmp_path / "reference"
    assert build(reference).exit_code == 0
    out = small_disk / "o"
    full = build(out)
    assert full.exit_code == 2, full.output
    assert "No space left on device" in full.output and "free some space" in full.output
    assert "Traceback" not in full.output
    assert any(out.glob("_work/done/train-*.json")), "the disk filled before any shard: make the tmpfs larger"
    assert not [p for p in out.rglob("*.tmp-*")] and not (out / ".mifa-lock.json").exists()
    subprocess.run(["mount", "-o", "remount,size=8m", str(small_disk)], check=True)
    resumed = build(out)
    assert resumed.exit_code == 0 and "resumed" in resumed.output, resumed.output
    assert digests(out) == digests(reference)
