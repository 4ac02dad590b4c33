"""Whole builds in one process (LocalRunner) with the fast fake model: shards, resume, verify, bad input."""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import webdataset as wds

from mifa_pipeline.inspect import verify
from mifa_pipeline.runner import BuildError, LocalRunner, prepare


def build(manifest, fresh=False):
    return LocalRunner(prepare(manifest, fresh=fresh), progress=False).run()


def digests(folder: Path) -> dict[str, str]:
    names = sorted(p.name for p in folder.iterdir() if p.suffix in (".tar", ".parquet") or p.name == "shardindex.json")
    return {n: hashlib.sha256((folder / n).read_bytes()).hexdigest() for n in names}


def test_build_writes_contiguous_fixed_size_shards_readable_by_webdataset(small_manifest, fake_model):
    m = small_manifest()
    result = build(m)
    shards = result.manifest["shards"]
    assert [s["path"] for s in shards] == [f"train-{i:06d}.tar" for i in range(4)]
    assert [s["nsamples"] for s in shards] == [5, 5, 5, 3]
    assert verify(m.output) == []
    urls = str(m.output / "train-{000000..000003}.tar")
    samples = list(wds.WebDataset(urls, shardshuffle=False).decode("rgb").to_tuple("__key__", "png", "json", "cls"))
    assert len(samples) == 18
    key, image, meta, cls = samples[4]
    assert key == "id0000001-s0001" == meta["key"] and cls == 1 == meta["identity"]
    assert image.shape == (32, 32, 3)
    assert set(meta["intensity"]) == set(meta["requested_aus"]) == set(result.manifest["au_names"])
    assert all(0 <= v <= 5 for v in meta["intensity"].values())
    assert "<ID> <ID2>" in meta["prompt"] and meta["demographics"]


def test_run_manifest_records_lineage_counts_and_shards(small_manifest, fake_model):
    m = small_manifest()
    c = build(m).manifest
    assert c["schema_version"] == 1 and c["parent"] is None
    assert [f["stage"] for f in c["stage_fingerprints"]] == ["prompts", "identities", "generate", "filter", "write"]
    assert c["fingerprint"] == c["stage_fingerprints"][-1]["fingerprint"]
    assert c["stages"]["generate"]["in"] == 18 and c["stages"]["write"]["out"] == 18
    assert c["packages"]["torch"] and c["code"]["mifa"]
    for s in c["shards"]:
        assert hashlib.sha256((m.output / s["path"]).read_bytes()).hexdigest() == s["sha256"]
    index = json.loads((m.output / "shardindex.json").read_text())
    assert index["__kind__"] == "wids-shard-index-v1" and index["shardlist"][0]["url"] == "train-000000.tar"


def test_same_manifest_gives_identical_bytes_whatever_batch_and_unit_size(small_manifest, fake_model, tmp_path):
    a = small_manifest("sampler.batch_size=1", "resources.identities_per_unit=1", out=tmp_path / "a")
    b = small_manifest("sampler.batch_size=7", "resources.identities_per_unit=4", out=tmp_path / "b")
    build(a)
    build(b)
    assert digests(a.output) == digests(b.output)
    c = small_manifest("seed=1", out=tmp_path / "c")
    build(c)
    assert digests(c.output) != digests(a.output)


def test_drops_keep_shards_full_and_are_counted(small_manifest, fake_model):
    # every image of the fake has pixel std well below 1000: all dropped as blank, none written
    m = small_manifest("filter.min_pixel_std=1000")
    c = build(m).manifest
    assert c["stages"]["filter"]["dropped"] == {"blank_image": 18}
    assert c["shards"] == [] and c["counts"]["kept_samples"] == 0
    assert verify(m.output) == []


def test_verify_catches_a_flipped_byte(small_manifest, fake_model):
    m = small_manifest()
    build(m)
    path = m.output / "train-000001.tar"
    data = bytearray(path.read_bytes())
    data[700] ^= 0x01
    path.write_bytes(bytes(data))
    problems = verify(m.output)
    assert any("train-000001.tar: sha256" in p for p in problems)


def test_verify_catches_a_missing_shard_and_a_stray_one(small_manifest, fake_model):
    m = small_manifest()
    build(m)
    (m.output / "train-000002.tar").rename(m.output / "train-000009.tar")
    problems = verify(m.output)
    assert any("train-000002.tar: missing" in p for p in problems)
    assert any("train-000009.tar: a shard file the manifest does not list" in p for p in problems)


def test_completed_build_is_not_redone_and_another_manifest_is_refused(small_manifest, fake_model):
    m = small_manifest()
    build(m)
    before = digests(m.output)
    manifest_bytes = (m.output / "manifest.json").read_bytes()
    assert prepare(m).state == "complete"
    assert build(m).state == "complete"
    other = small_manifest("seed=5")
    with pytest.raises(BuildError, match="different manifest"):
        prepare(other)
    assert digests(m.output) == before and (m.output / "manifest.json").read_bytes() == manifest_bytes
    rebuilt = build(other, fresh=True)
    assert rebuilt.state == "built" and digests(m.output) != before


def test_editing_a_model_card_keeps_the_build_while_a_changed_weight_does_not(small_manifest, fake_model, tmp_path):
    model = tmp_path / "model"
    (model / "unet").mkdir(parents=True)
    (model / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"weights v1")
    (model / "MODEL_CARD.md").write_text("first figures\n")
    m = small_manifest(f"model.checkpoint={model}")
    build(m)
    (model / "MODEL_CARD.md").write_text("better-worded figures\n")
    (model / "samples.png").write_bytes(b"a new grid")
    assert prepare(m).state == "complete"     # the same model: nothing to redo
    (model / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"weights v2")
    with pytest.raises(BuildError, match="different manifest"):
        prepare(m)


def test_bad_input_writes_nothing(small_manifest, fake_model, tmp_path):
    with pytest.raises(BuildError, match="model.checkpoint: .*does not exist"):
        prepare(small_manifest("model.checkpoint=/nonexistent/model", out=tmp_path / "x"))
    assert not (tmp_path / "x").exists()
    (tmp_path / "afile").write_text("not a folder")
    with pytest.raises(BuildError, match="is a file"):
        prepare(small_manifest(out=tmp_path / "afile" / "out"))
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(BuildError, match="not empty and holds no mifa build"):
        prepare(small_manifest(out=foreign), fresh=True)
    assert (foreign / "notes.txt").read_text() == "mine"


def test_a_failing_first_run_leaves_no_folder(small_manifest, monkeypatch, tmp_path):
    def broken(*args, **kwargs):
        raise RuntimeError("model file is corrupt")

    monkeypatch.setattr("mifa_pipeline.stages.generate.load_model", broken)
    m = small_manifest(out=tmp_path / "new")
    with pytest.raises(RuntimeError, match="corrupt"):
        build(m)
    assert not m.output.exists()


KILLABLE = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {root!r})
    from tests.fake_model import FakeMAUGen
    import mifa_pipeline.stages.generate as generate
    model = FakeMAUGen()
    slow = model.sample
    def sample(*a, **k):
        time.sleep(0.15)
        return slow(*a, **k)
    model.sample = sample
    generate.load_model = lambda *a, **k: model
    from mifa_pipeline.config import load_manifest
    from mifa_pipeline.runner import LocalRunner, prepare
    m = load_manifest(None, {overrides!r}, output={out!r})
    LocalRunner(prepare(m), progress=False).run()
""")


def test_resume_after_sigkill_is_byte_identical(small_manifest, fake_model, tmp_path):
    overrides = ["identities.count=6", "identities.samples_per_identity=3", "resources.identities_per_unit=1",
                 "writer.samples_per_shard=5", "sampler.steps=2", "sampler.batch_size=2"]
    reference = small_manifest(*overrides[2:], out=tmp_path / "ref")
    build(reference)
    out = tmp_path / "killed"
    script = KILLABLE.format(root=str(Path(__file__).parent.parent), overrides=overrides, out=str(out))
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    units = out / "_work" / "units"
    deadline = time.time() + 300   # the child imports torch first: minutes on a loaded 2-core machine
    committed = 0
    while time.time() < deadline and proc.poll() is None:
        committed = len([p for p in units.iterdir() if not p.name.startswith(".")]) if units.is_dir() else 0
        if committed >= 3:
            break
        time.sleep(0.02)
    assert proc.poll() is None, proc.stderr.read().decode()
    assert committed >= 3, "the build to kill committed no unit in time; the test did not get to kill it mid-build"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists()
    resumed = build(small_manifest(*overrides[2:], out=out))
    assert resumed.state == "resumed" and resumed.units_run < 6
    assert digests(out) == digests(reference.output)
    assert verify(out) == []


def test_resume_reads_images_only_for_shards_still_to_write(small_manifest, fake_model, monkeypatch):
    """A resume replays the committed units in order; those whose shards exist are recounted from their
    metadata, so a 90%-written data set is not read back from disk image by image. A first run reads each
    unit once."""
    import mifa_pipeline.pool as pool

    reads = []  # unit index of every read of samples.parquet (with or without images)
    real_samples, real_metadata = pool.read_samples, pool.read_sample_metadata

    def read_samples(out, unit, columns=None):
        reads.append((unit.index, "image" if columns is None or "image" in columns else "metadata"))
        return real_samples(out, unit, columns)

    def read_sample_metadata(out, unit):
        reads.append((unit.index, "metadata"))
        return real_metadata(out, unit)

    monkeypatch.setattr(pool, "read_samples", read_samples)
    monkeypatch.setattr(pool, "read_sample_metadata", read_sample_metadata)
    m = small_manifest("identities.count=6", "identities.samples_per_identity=3", "resources.identities_per_unit=1",
                       "writer.samples_per_shard=5")
    build(m)
    assert sorted(reads) == [(u, "image") for u in range(6)]
    reference = digests(m.output)
    # as if killed after writing shards 0 and 1 (units 0-2 and part of 3) and before committing unit 5
    for name in ("manifest.json", "shardindex.json"):
        (m.output / name).unlink()
    for shard in ("train-000002", "train-000003"):
        for path in [*m.output.glob(shard + ".*"), *(m.output / "_work" / "shards").glob(shard + ".*")]:
            path.unlink()
    units = sorted(p for p in (m.output / "_work" / "units").iterdir())
    shutil.rmtree(units[-1])

    reads.clear()
    result = build(m)
    assert result.state == "resumed" and result.units_run == 1
    assert sorted({u for u, what in reads if what == "image"}) == [3, 4, 5]
    assert digests(m.output) == reference
    assert verify(m.output) == []


def test_face_check_with_the_real_yunet_detector(small_manifest, fake_model):
    """The fake draws no faces: with YuNet on, every sample is dropped as no_face and the judge is recorded."""
    from mifa_pipeline.faces import models_available

    if not models_available():
        pytest.skip("run scripts/install-face-models.sh (make setup does)")
    m = small_manifest("filter.face.detector=yunet")
    c = build(m).manifest
    assert c["stages"]["filter"]["dropped"] == {"no_face": 18}
    judge = [f for f in c["models"] if f["role"] == "judge:face"]
    assert judge and len(judge[0]["sha256"]) == 64


def test_missing_face_model_is_a_clear_error(small_manifest, tmp_path):
    m = small_manifest("filter.face.detector=yunet", f"filter.models_dir={tmp_path}", out=tmp_path / "o")
    with pytest.raises(BuildError, match="filter.face.detector: yunet needs .*missing"):
        prepare(m)
    assert not (tmp_path / "o").exists()


def test_unknown_au_estimator_is_a_clear_error(small_manifest, tmp_path):
    from mifa_pipeline.faces import MODEL_FILES

    (tmp_path / MODEL_FILES["yunet"].filename).write_bytes(b"a detector file")  # prepare only hashes it
    m = small_manifest("filter.face.detector=yunet", "filter.au.estimator=openface", f"filter.models_dir={tmp_path}",
                       out=tmp_path / "o")
    with pytest.raises(BuildError, match="filter.au.estimator: 'openface' is not an AU estimator"):
        prepare(m)
    assert not (tmp_path / "o").exists()


def test_interrupted_refilter_resumes_to_the_same_bytes(small_manifest, fake_model, tmp_path, monkeypatch):
    from mifa_pipeline import refilter as rf

    parent = small_manifest(out=tmp_path / "v1")
    build(parent)
    sets = ["filter.min_pixel_std=46"]
    rf.LocalRefilterRunner(rf.prepare_refilter(parent.output, sets, tmp_path / "whole"), progress=False).run()
    real, calls = rf.refilter_unit, []

    def dies_on_the_second_unit(*args):
        calls.append(args[-1].name)
        if len(calls) == 2:
            raise KeyboardInterrupt  # as if the process were stopped mid-way
        return real(*args)

    monkeypatch.setattr(rf, "refilter_unit", dies_on_the_second_unit)
    with pytest.raises(KeyboardInterrupt):
        rf.LocalRefilterRunner(rf.prepare_refilter(parent.output, sets, tmp_path / "cut"), progress=False).run()
    assert not (tmp_path / "cut" / "manifest.json").exists()
    monkeypatch.setattr(rf, "refilter_unit", real)
    again = rf.prepare_refilter(parent.output, sets, tmp_path / "cut")
    assert again.state == "resume"
    result = rf.LocalRefilterRunner(again, progress=False).run()
    assert result.state == "resumed" and result.units_run == 2
    assert digests(tmp_path / "cut") == digests(tmp_path / "whole")


def test_teacher_rendered_identities_feed_the_generator(small_manifest, fake_model):
    """identities.source=teacher: references are procedural faces, prompts describe them."""
    from mifa_pipeline import pool

    m = small_manifest("identities.source=teacher")
    build(m)
    unit = prepare(m).plan.units[0]
    people = pool.read_identities(m.output, unit)
    assert {p["source"] for p in people} == {"teacher"}
    rows = pool.read_samples(m.output, unit)
    demographics = json.loads(rows[0]["demographics"])
    assert set(demographics) == {"skin", "eyes", "hair", "clothing"} and demographics["hair"] in rows[0]["prompt"]
