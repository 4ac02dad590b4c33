"""Whole builds in one process (local executor) with the fast fake model: shards, resume, verify, bad input."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import webdataset as wds

from mifa_pipeline.runner import BuildError, build_data, prepare
from mifa_pipeline.verify import verify
from tests.outputs import digests

ROOT = Path(__file__).resolve().parent.parent


def build(manifest, fresh=False):
    return build_data(prepare(manifest, fresh=fresh), "local", progress=False)


def test_build_writes_shards_of_planned_slots_readable_by_webdataset(small_manifest, fake_model):
    m = small_manifest()
    result = build(m)
    shards = result.manifest["shards"]
    assert [s["path"] for s in shards] == [f"train-{i:06d}.tar" for i in range(4)]
    assert [s["planned"] for s in shards] == [5, 5, 5, 3] == [s["nsamples"] for s in shards]
    assert verify(Path(m.output)) == []
    urls = str(Path(m.output) / "train-{000000..000003}.tar")
    samples = list(wds.WebDataset(urls, shardshuffle=False).decode("rgb").to_tuple("__key__", "png", "json", "cls"))
    assert len(samples) == 18
    key, image, meta, cls = samples[4]
    assert key == "id0000001-s0001" == meta["key"] and cls == 1 == meta["identity"]
    assert image.shape == (32, 32, 3)
    assert set(meta["intensity"]) == set(meta["requested_aus"]) == set(result.manifest["au_names"])
    assert "<ID> <ID2>" in meta["prompt"] and meta["demographics"]
    people = pq.read_table(Path(m.output) / "identities.parquet").to_pylist()
    assert [p["identity"] for p in people] == list(range(6)) and all(p["reference_png"] for p in people)
    assert not (Path(m.output) / "_work" / "identities").exists()  # published: the blocks are gone


def test_drops_leave_each_shard_its_own_slots(small_manifest, fake_model, tmp_path):
    """Shard k holds the kept samples of slots [5k, 5k+5): drops shrink it and never move samples between shards."""
    all_kept = build(small_manifest(out=tmp_path / "all")).manifest
    m = small_manifest("filter.min_pixel_std=46", out=tmp_path / "some")
    c = build(m).manifest
    assert [s["planned"] for s in c["shards"]] == [5, 5, 5, 3]
    assert 0 < c["counts"]["kept_samples"] < 18 and c["stages"]["filter"]["dropped"]["blank_image"] > 0
    for full, cut in zip(all_kept["shards"], c["shards"]):
        keys = [r["key"] for r in pq.read_table(Path(m.output) / cut["sidecar"]["path"], columns=["key"]).to_pylist()]
        assert set(keys) <= set(full_keys(tmp_path / "all", full))
        scores = pq.read_table(Path(m.output) / cut["scores"]["path"]).to_pylist()
        assert [r["key"] for r in scores] == full_keys(tmp_path / "all", full)  # every planned sample has a row
        assert all(r["image"] is None for r in scores if r["keep"]) and all(r["image"] for r in scores if not r["keep"])
    assert verify(Path(m.output)) == []


def full_keys(folder, shard):
    return [r["key"] for r in pq.read_table(folder / shard["sidecar"]["path"], columns=["key"]).to_pylist()]


def test_run_manifest_records_lineage_counts_and_every_file(small_manifest, fake_model):
    m = small_manifest()
    c = build(m).manifest
    assert c["schema_version"] == 2 and c["parent"] is None and c["kind"] == "mifa-build"
    assert [f["stage"] for f in c["stage_fingerprints"]] == ["prompts", "identities", "generate", "filter", "write"]
    assert list(c["stages"]) == ["prompts", "identities", "duplicates", "generate", "filter", "write"]
    assert c["stages"]["generate"]["in"] == 18 and c["stages"]["write"]["out"] == 18
    for s in c["shards"]:
        for entry in (s, s["sidecar"], s["scores"]):
            assert hashlib.sha256((Path(m.output) / entry["path"]).read_bytes()).hexdigest() == entry["sha256"]
    assert c["identities"]["rows"] == 6
    index = json.loads((Path(m.output) / "shardindex.json").read_text())
    assert index["__kind__"] == "wids-shard-index-v1" and index["shardlist"][0]["url"] == "train-000000.tar"


def test_same_manifest_gives_identical_bytes_whatever_batch_and_block_size(small_manifest, fake_model, tmp_path):
    a = small_manifest("sampler.batch_size=1", "resources.identities_per_unit=1", out=tmp_path / "a")
    b = small_manifest("sampler.batch_size=7", "resources.identities_per_unit=4", out=tmp_path / "b")
    build(a)
    build(b)
    assert digests(Path(a.output)) == digests(Path(b.output))
    c = small_manifest("seed=1", out=tmp_path / "c")
    build(c)
    assert digests(Path(c.output)) != digests(Path(a.output))


def test_drops_are_counted_and_an_all_dropped_shard_is_empty(small_manifest, fake_model):
    m = small_manifest("filter.min_pixel_std=127.5")   # every image is 'blank' at this contrast: only if allowed
    with pytest.raises(BuildError, match=r"filter\.min_pixel_std=127\.5 .*drops every sample.*--allow-empty"):
        prepare(m)
    assert not Path(m.output).exists()
    c = build_data(prepare(m, allow_empty=True), "local", progress=False).manifest
    assert c["stages"]["filter"]["dropped"] == {"blank_image": 18}
    assert [s["nsamples"] for s in c["shards"]] == [0, 0, 0, 0] and c["counts"]["kept_samples"] == 0
    full = small_manifest(out=Path(m.output).parent / "full")
    build(full)  # an empty sidecar has the columns and types of a full one (readers see one schema)
    assert pq.read_schema(Path(m.output) / "train-000000.parquet") == pq.read_schema(Path(full.output) / "train-000000.parquet")
    assert list(wds.WebDataset(str(Path(m.output) / "train-000000.tar"), shardshuffle=False, empty_check=False)) == []
    assert verify(Path(m.output)) == []


# ---------------------------------------------------------------------------------- verify
def _edit_json(path, edit):
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data, indent=2))


def _flip(path, at=700):
    data = bytearray(path.read_bytes())
    data[min(at, len(data) - 1)] ^= 0x01
    path.write_bytes(bytes(data))


VERIFY_EDITS = {
    "flipped tar byte": (lambda o: _flip(o / "train-000001.tar"), "train-000001.tar: sha256"),
    "flipped sidecar byte": (lambda o: _flip(o / "train-000001.parquet", 300), "train-000001.parquet: sha256"),
    "flipped scores byte": (lambda o: _flip(o / "scores" / "train-000002.parquet", 300), "scores/train-000002.parquet: sha256"),
    "flipped identity table": (lambda o: _flip(o / "identities.parquet", 300), "identities.parquet: sha256"),
    "deleted shard": (lambda o: (o / "train-000002.tar").unlink(), "train-000002.tar: missing"),
    "stray shard": (lambda o: (o / "train-000009.tar").write_bytes(b"x"), "train-000009.tar: a file the run manifest"),
    "stray sidecar": (lambda o: (o / "scores" / "extra.parquet").write_bytes(b"x"), "scores/extra.parquet: a file"),
    "stale md5 in manifest": (lambda o: _edit_json(o / "manifest.json", lambda d: d["shards"][0].update(md5="0" * 32)),
                              "train-000000.tar: md5"),
    "stale blake3 in manifest": (lambda o: _edit_json(o / "manifest.json", lambda d: d["shards"][0].update(blake3="0" * 64)),
                                 "train-000000.tar: blake3"),
    "stale md5 in index": (lambda o: _edit_json(o / "shardindex.json", lambda d: d["shardlist"][0].update(md5sum="0" * 32)),
                           "shardindex.json: does not match"),
    "edited build_manifest": (lambda o: _edit_json(o / "manifest.json", lambda d: d["build_manifest"].update(seed=7)),
                              "fingerprint does not follow"),
    "edited counts": (lambda o: _edit_json(o / "manifest.json", lambda d: d["counts"].update(kept_samples=17)),
                      "counts: shards hold 18"),
    "edited stage counts": (lambda o: _edit_json(o / "manifest.json", lambda d: d["stages"]["filter"]["dropped"].update(no_face=1)),
                            "stages.filter"),
}


def _rewrite_sidecar(out, change):
    """Edit the sidecar and record its new hashes in the run manifest, as a careful forger would."""
    path = out / "train-000000.parquet"
    pq.write_table(change(pq.read_table(path)), path)
    data = path.read_bytes()
    _edit_json(out / "manifest.json", lambda d: d["shards"][0]["sidecar"].update(
        sha256=hashlib.sha256(data).hexdigest(), md5=hashlib.md5(data).hexdigest(), bytes=len(data),
        blake3=__import__("blake3").blake3(data).hexdigest()))


VERIFY_EDITS["sidecar row edited (hashes updated)"] = (
    lambda o: _rewrite_sidecar(o, lambda t: t.set_column(t.schema.get_field_index("intensity_AU12"), "intensity_AU12",
                                                         __import__("pyarrow").array([9.0] * t.num_rows))),
    "train-000000.parquet: row id0000000-s0000 disagrees with its tar member in ['intensity_AU12']")
VERIFY_EDITS["sidecar column dropped (hashes updated)"] = (
    lambda o: _rewrite_sidecar(o, lambda t: t.drop_columns(["prompt"])), "disagrees with its tar member in ['prompt']")


@pytest.fixture(scope="module")
def verified_build(tmp_path_factory):
    from mifa_pipeline.config import load_manifest
    from tests.fake_model import FakeMAUGen
    import mifa_pipeline.stages.generate as generate

    real = generate.load_model
    generate.load_model = lambda *a, **k: FakeMAUGen()
    try:
        m = load_manifest(None, ["identities.count=6", "identities.samples_per_identity=3", "writer.samples_per_shard=5",
                                 "resources.identities_per_unit=2", "sampler.steps=2"],
                          output=tmp_path_factory.mktemp("v") / "out")
        build(m)
    finally:
        generate.load_model = real
    return Path(m.output)


@pytest.mark.parametrize("edit", sorted(VERIFY_EDITS))
def test_verify_names_each_kind_of_damage(verified_build, tmp_path, edit):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(verified_build, out)
    assert verify(out) == []
    change, expected = VERIFY_EDITS[edit]
    change(out)
    problems = verify(out)
    assert any(expected in p for p in problems), problems


# ---------------------------------------------------------------------------------- output folders
def test_completed_build_is_not_redone_and_another_manifest_is_refused(small_manifest, fake_model):
    m = small_manifest()
    build(m)
    before = digests(Path(m.output))
    manifest_bytes = (Path(m.output) / "manifest.json").read_bytes()
    assert prepare(m).state == "complete"
    assert build(m).state == "complete"
    other = small_manifest("seed=5")
    with pytest.raises(BuildError, match="different manifest"):
        prepare(other)
    assert digests(Path(m.output)) == before and (Path(m.output) / "manifest.json").read_bytes() == manifest_bytes
    rebuilt = build(other, fresh=True)
    assert rebuilt.state == "built" and digests(Path(m.output)) != before


def test_an_output_of_the_earlier_layout_is_refused_with_a_clear_message(small_manifest, tmp_path):
    out = tmp_path / "old"
    (out / "_work" / "units" / "unit-0000000-0000002").mkdir(parents=True)
    (out / "manifest.json").write_text(json.dumps({"schema_version": 1, "fingerprint": "abc"}))
    with pytest.raises(BuildError, match="earlier mifa layout"):
        prepare(small_manifest(out=out))
    from mifa_pipeline.refilter import prepare_refilter

    with pytest.raises(BuildError, match="earlier mifa layout"):
        prepare_refilter(out, [])
    with pytest.raises(ValueError, match="earlier mifa layout"):
        verify(out)


def test_editing_a_model_card_keeps_the_build_while_a_changed_weight_does_not(small_manifest, fake_model, tmp_path):
    model = tmp_path / "model"
    (model / "unet").mkdir(parents=True)
    (model / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"weights v1")
    (model / "maugen_config.json").write_text("{}")  # what makes a folder a mifa checkpoint
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
    assert not Path(m.output).exists()


def test_a_failing_run_removes_only_what_it_wrote(small_manifest, fake_model, monkeypatch, tmp_path):
    """A run that fails mid-way keeps its finished shards (resumable) and leaves no lock or temporary file."""
    from mifa_pipeline import work

    m = small_manifest(out=tmp_path / "o")
    real, calls = work.BuildWorker.make_shard, []

    def dies_on_the_third(self, shard):
        calls.append(shard.name)
        if len(calls) == 3:
            raise RuntimeError("GPU fell off the bus")
        return real(self, shard)

    monkeypatch.setattr(work.BuildWorker, "make_shard", dies_on_the_third)
    with pytest.raises(RuntimeError, match="GPU fell off"):
        build(m)
    left = sorted(p.name for p in Path(m.output).iterdir())
    assert left == ["_work", "identities.parquet", "scores", "train-000000.parquet", "train-000000.tar",
                    "train-000001.parquet", "train-000001.tar"]
    monkeypatch.setattr(work.BuildWorker, "make_shard", real)
    assert build(m).units_run == 2


# ---------------------------------------------------------------------------------- resume adopts only what it can prove
DAMAGE = {
    "tar flipped": lambda o: _flip(o / "train-000001.tar"),
    "tar truncated": lambda o: (o / "train-000001.tar").write_bytes((o / "train-000001.tar").read_bytes()[:1000]),
    "tar deleted": lambda o: (o / "train-000001.tar").unlink(),
    "sidecar flipped": lambda o: _flip(o / "train-000001.parquet", 200),
    "sidecar deleted": lambda o: (o / "train-000001.parquet").unlink(),
    "scores flipped": lambda o: _flip(o / "scores" / "train-000001.parquet", 200),
    "scores deleted": lambda o: (o / "scores" / "train-000001.parquet").unlink(),
    "done record deleted": lambda o: (o / "_work" / "done" / "train-000001.json").unlink(),
    "done record emptied": lambda o: (o / "_work" / "done" / "train-000001.json").write_text(""),
    "done record of another build": lambda o: _edit_json(o / "_work" / "done" / "train-000001.json",
                                                         lambda d: d.update(fingerprint="f" * 64)),
    "build record deleted too": lambda o: [(o / "_work" / "build.json").unlink(), (o / "train-000001.tar").unlink()],
    "build record emptied too": lambda o: [(o / "_work" / "build.json").write_text(""),
                                           (o / "train-000001.parquet").unlink()],
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_resume_redoes_exactly_the_damaged_shard(small_manifest, fake_model, tmp_path, damage):
    m = small_manifest(out=tmp_path / "o")
    build(m)
    reference = digests(Path(m.output))
    (Path(m.output) / "manifest.json").unlink()  # as if killed before the end
    DAMAGE[damage](Path(m.output))
    result = build(m)
    assert result.state == "resumed" and result.units_run == 1
    if damage != "done record deleted":  # a missing record is simply work not done yet
        assert [n.split(":")[0] for n in result.notes] == ["train-000001"]
    assert digests(Path(m.output)) == reference and verify(Path(m.output)) == []


@pytest.mark.parametrize("shard_missing", [True, False], ids=["a shard to redo", "every shard proven"])
def test_a_damaged_identity_table_is_redone_and_never_shipped(small_manifest, fake_model, tmp_path, shard_missing):
    m = small_manifest(out=tmp_path / "o")
    build(m)
    reference = digests(Path(m.output))
    (Path(m.output) / "manifest.json").unlink()
    if shard_missing:
        (Path(m.output) / "train-000003.tar").unlink()
    _flip(Path(m.output) / "identities.parquet", 300)
    result = build(m)
    assert any(n.startswith("identities.parquet: redone") for n in result.notes)
    assert digests(Path(m.output)) == reference


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
    sys.argv = ["mifa", "build", "--out", {out!r}, "--runner", "local", "--no-progress",
                *[x for o in {overrides!r} for x in ("--set", o)]]
    from mifa_pipeline.cli import app
    app()
""")
OVERRIDES = ["identities.count=6", "identities.samples_per_identity=3", "resources.identities_per_unit=1",
             "writer.samples_per_shard=2", "sampler.steps=2", "sampler.batch_size=2",
             "filter.face.detector=none", "filter.identity.embedder=none", "filter.au.estimator=none"]


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_stopped_mid_build_then_resumed_is_byte_identical(small_manifest, fake_model, tmp_path, sig):
    reference = small_manifest(*OVERRIDES[2:], out=tmp_path / "ref")
    build(reference)
    out = tmp_path / "stopped"
    script = KILLABLE.format(root=str(ROOT), overrides=OVERRIDES, out=str(out))
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    done = out / "_work" / "done"
    deadline = time.time() + 300   # the child imports torch first: minutes on a loaded 2-core machine
    finished = 0
    while time.time() < deadline and proc.poll() is None:
        finished = len(list(done.glob("train-*.json"))) if done.is_dir() else 0
        if finished >= 2:
            break
        time.sleep(0.02)
    assert proc.poll() is None, proc.stderr.read()
    assert finished >= 2, "the build to stop finished no shard in time; the test did not get to stop it mid-build"
    os.kill(proc.pid, sig)
    _, stderr = proc.communicate(timeout=60)
    if sig == signal.SIGTERM:
        assert proc.returncode == 130 and "interrupted" in stderr and "run the same command again" in stderr, stderr
        assert not (out / ".mifa-lock.json").exists()   # a clean stop releases the output
    assert not (out / "manifest.json").exists()
    resumed = build(small_manifest(*OVERRIDES[2:], out=out))
    assert resumed.state == "resumed" and resumed.units_run < 9
    assert digests(out) == digests(reference.output)
    assert verify(out) == []


# ---------------------------------------------------------------------------------- one build per output
def test_a_second_build_into_a_held_output_is_refused_and_the_first_is_intact(small_manifest, fake_model, tmp_path):
    from mifa_pipeline.lock import OutputLock

    m = small_manifest(out=tmp_path / "o")
    other = small_manifest("seed=1", out=tmp_path / "o")
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(ROOT)!r})
        from pathlib import Path
        from mifa_pipeline.lock import OutputLock
        OutputLock(Path({str(Path(m.output))!r})).acquire()
        print("held", flush=True)
        time.sleep(60)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        for manifest, fresh in ((m, False), (other, True)):
            with pytest.raises(BuildError, match=f"in use by another run: .*pid {holder.pid}"):
                build(manifest, fresh=fresh)
        assert sorted(p.name for p in Path(m.output).iterdir()) == [".mifa-lock.json"]
    finally:
        holder.kill()
        holder.wait()
    result = build(m)   # the holder died: its lock is taken over, with a message
    assert result.state == "built" and any("took over the lock of a dead run" in n for n in result.notes)
    assert not (Path(m.output) / ".mifa-lock.json").exists() and verify(Path(m.output)) == []
    assert OutputLock(Path(m.output)).acquire() is None


def test_two_concurrent_builds_one_is_refused_and_the_running_one_finishes_intact(small_manifest, fake_model, tmp_path):
    """A real build is running; a second one (same manifest, or another with --fresh) is refused naming it,
    deletes nothing, and the first finishes as if alone."""
    reference = small_manifest(*OVERRIDES[2:], out=tmp_path / "ref")
    build(reference)
    out = tmp_path / "shared"
    script = KILLABLE.format(root=str(ROOT), overrides=OVERRIDES, out=str(out))
    first = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and first.poll() is None and not list(out.glob("_work/done/train-*.json")):
        time.sleep(0.02)
    assert first.poll() is None, first.stderr.read()
    for manifest, fresh in ((small_manifest(*OVERRIDES[2:], out=out), False), (small_manifest("seed=1", out=out), True)):
        with pytest.raises(BuildError, match=f"in use by another run: .*pid {first.pid}"):
            build(manifest, fresh=fresh)
    _, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr
    assert digests(out) == digests(reference.output) and verify(out) == []


# ---------------------------------------------------------------------------------- judges and identities
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


def test_duplicate_identities_are_dropped_before_any_of_their_samples_is_generated(small_manifest, fake_model, tmp_path,
                                                                                   monkeypatch):
    """Identity 1's reference is identity 0's: it is found in the identity phase and costs no generation."""
    import numpy as np
    import skimage.data
    from PIL import Image

    from mifa_pipeline.faces import models_available

    if not models_available():
        pytest.skip("run scripts/install-face-models.sh (make setup does)")
    folder = tmp_path / "refs"
    folder.mkdir()
    astronaut = Image.fromarray(skimage.data.astronaut()).crop((130, 0, 330, 200))
    astronaut.save(folder / "a.png")
    astronaut.save(folder / "b.png")
    Image.fromarray(np.ascontiguousarray(np.asarray(astronaut)[:, ::-1])).save(folder / "c.png")  # mirrored: close too
    from mifa_pipeline.judging import Judges

    embedded = []  # identities whose reference face went through the identity judge
    real = Judges.reference_embeddings

    def counted(self, references):
        embedded.extend(references)
        return real(self, references)

    monkeypatch.setattr(Judges, "reference_embeddings", counted)
    m = small_manifest("identities.count=3", "identities.source=folder", f"identities.folder={folder}",
                       "sampler.resolution=64", "filter.face.detector=yunet", "filter.face.min_fraction=0",
                       "filter.identity.embedder=sface", "filter.identity.duplicate_cosine=0.99", out=tmp_path / "o")
    c = build(m).manifest
    assert sorted(embedded) == [0, 1, 2]   # once each, in the identity phase: no shard embeds them again
    people = pq.read_table(Path(m.output) / "identities.parquet").to_pylist()
    assert [p["duplicate"] for p in people] == [False, True, False]
    assert people[1]["nearest_earlier_cosine"] > 0.99 and people[0]["nearest_earlier_cosine"] is None
    assert c["counts"]["duplicate_identities"] == 1
    assert c["stages"]["duplicates"]["dropped"] == {"duplicate_identity": 3}
    assert c["stages"]["generate"]["in"] == 6 and sum(fake_model.calls) == 6  # identity 1's 3 samples never ran
    assert verify(Path(m.output)) == []
    # a re-filter may tighten the duplicate threshold (identity 2, the mirrored face, goes too) but never loosen it
    from mifa_pipeline.refilter import prepare_refilter, run_refilter

    with pytest.raises(BuildError, match="can only tighten it"):
        prepare_refilter(Path(m.output), ["filter.identity.duplicate_cosine=0.999"], tmp_path / "loose")
    tight = run_refilter(prepare_refilter(Path(m.output), ["filter.identity.duplicate_cosine=0.5"], tmp_path / "tight"),
                         "local", progress=False).manifest
    assert tight["counts"]["duplicate_identities"] == 2 and tight["counts"]["kept_samples"] == 0
    rows = pq.read_table(tmp_path / "tight" / "scores" / "train-000001.parquet").to_pylist()
    mirrored = [r for r in rows if r["identity"] == 2]
    assert mirrored and all(r["drop_reason"] == "duplicate_identity" and r["image"] for r in mirrored)
    assert verify(tmp_path / "tight") == []


def test_teacher_rendered_identities_feed_the_generator(small_manifest, fake_model):
    """identities.source=teacher: references are procedural faces, prompts describe them."""
    m = small_manifest("identities.source=teacher")
    build(m)
    people = pq.read_table(Path(m.output) / "identities.parquet").to_pylist()
    assert {p["source"] for p in people} == {"teacher"}
    rows = pq.read_table(Path(m.output) / "scores" / "train-000000.parquet").to_pylist()
    demographics = json.loads(rows[0]["demographics"])
    assert set(demographics) == {"skin", "eyes", "hair", "clothing"} and demographics["hair"] in rows[0]["prompt"]


def test_interrupted_refilter_resumes_to_the_same_bytes(small_manifest, fake_model, tmp_path, monkeypatch):
    from mifa_pipeline import refilter as rf

    parent = small_manifest(out=tmp_path / "v1")
    build(parent)
    sets = ["filter.min_pixel_std=46"]
    rf.run_refilter(rf.prepare_refilter(Path(parent.output), sets, tmp_path / "a" / "whole"), "local", progress=False)
    real, calls = rf.RefilterWorker.make_shard, []

    def dies_on_the_third_shard(self, shard):
        calls.append(shard.name)
        if len(calls) == 3:
            raise KeyboardInterrupt  # as if the process were stopped mid-way
        return real(self, shard)

    monkeypatch.setattr(rf.RefilterWorker, "make_shard", dies_on_the_third_shard)
    with pytest.raises(KeyboardInterrupt):
        rf.run_refilter(rf.prepare_refilter(Path(parent.output), sets, tmp_path / "b" / "cut"), "local", progress=False)
    assert not (tmp_path / "b" / "cut" / "manifest.json").exists()
    monkeypatch.setattr(rf.RefilterWorker, "make_shard", real)
    again = rf.prepare_refilter(Path(parent.output), sets, tmp_path / "b" / "cut")
    assert again.state == "resume"
    result = rf.run_refilter(again, "local", progress=False)
    assert result.state == "resumed" and result.units_run == 2
    assert digests(tmp_path / "b" / "cut") == digests(tmp_path / "a" / "whole")
    assert verify(tmp_path / "b" / "cut") == []


@pytest.mark.parametrize("tiny_scores", [False, True], ids=["scores", "scores-below-1e-4"])
def test_a_threshold_only_refilter_writes_the_bytes_a_build_with_that_threshold_writes(small_manifest, fake_model, tmp_path,
                                                                                      monkeypatch, tiny_scores):
    """Kept samples are copied as raw tar bytes (and sidecar rows) from the parent, the others rebuilt: the
    shards equal those of a build made with the new threshold from the start. Scores below 1e-4 (which JSON
    encoders spell differently) must not make the re-filter see a changed score."""
    import mifa_pipeline.stages.filter as filter_stage
    from mifa_pipeline.refilter import prepare_refilter, run_refilter
    from mifa_pipeline.shards import ShardFileWriter

    if tiny_scores:
        real_labels = filter_stage.label_scores
        monkeypatch.setattr(filter_stage, "label_scores", lambda sample: {
            **real_labels(sample), "au_mae_requested": round(1e-5 + sample.sample * 1e-5 + sample.identity * 1e-6, 7)})
    parent = small_manifest(out=tmp_path / "v1")
    build(parent)
    direct = small_manifest("filter.min_pixel_std=46", out=tmp_path / "direct")
    build(direct)
    calls = {"write": 0, "copy": 0}
    for name in calls:  # count how each kept sample reaches the new tar (the bytes alone cannot tell)
        real = getattr(ShardFileWriter, name)
        monkeypatch.setattr(ShardFileWriter, name,
                            lambda self, *a, _real=real, _name=name: (calls.__setitem__(_name, calls[_name] + 1), _real(self, *a))[1])
    v2 = run_refilter(prepare_refilter(Path(parent.output), ["filter.min_pixel_std=46"], tmp_path / "v2"), "local",
                      progress=False).manifest
    assert calls == {"write": 0, "copy": v2["counts"]["kept_samples"]}   # all copied: their scores did not change
    calls.update(write=0, copy=0)
    again = run_refilter(prepare_refilter(tmp_path / "v2", ["filter.min_pixel_std=2"], tmp_path / "v3"), "local",
                         progress=False).manifest
    assert calls == {"write": 18 - v2["counts"]["kept_samples"], "copy": v2["counts"]["kept_samples"]}
    tars = [f"train-{i:06d}.{ext}" for i in range(4) for ext in ("tar", "parquet")]
    assert {t: digests(tmp_path / "v2")[t] for t in tars} == {t: digests(direct.output)[t] for t in tars}
    assert {t: digests(tmp_path / "v3")[t] for t in tars} == {t: digests(Path(parent.output))[t] for t in tars}
    assert again["counts"]["kept_samples"] == 18   # the samples v2 dropped come back from its scores tables


def test_a_refilter_copies_whole_the_shards_it_decides_as_the_parent(small_manifest, fake_model, tmp_path, monkeypatch):
    """A shard whose every sample keeps its decision and scores is the parent's files, copied whole (no tar is
    written); the changed shard alone is rebuilt; the identity table (same threshold) is copied too."""
    from mifa_pipeline.refilter import prepare_refilter, run_refilter
    from mifa_pipeline.shards import ShardFileWriter

    parent = small_manifest(out=tmp_path / "v1")
    build(parent)
    stds = {r["key"]: json.loads(r["scores"])["pixel_std"] for f in sorted((Path(parent.output) / "scores").glob("*.parquet"))
            for r in pq.read_table(f, columns=["key", "scores"]).to_pylist()}
    lowest = min(stds, key=stds.get)  # a threshold just above it drops that one sample: one shard changes
    written = []
    real = ShardFileWriter.__init__
    monkeypatch.setattr(ShardFileWriter, "__init__", lambda self, out, name, *a, **k: (written.append(name), real(self, out, name, *a, **k))[1])
    v2 = run_refilter(prepare_refilter(Path(parent.output), [f"filter.min_pixel_std={stds[lowest] + 1e-6}"], tmp_path / "v2"),
                      "local", progress=False).manifest
    assert v2["counts"]["kept_samples"] == 17 and len(written) == 1
    changed = written[0].removesuffix(".tar")
    mine, theirs = digests(tmp_path / "v2"), digests(Path(parent.output))
    assert sorted(n for n in mine if mine[n] != theirs.get(n) and n != "shardindex.json") == sorted([f"{changed}.parquet", f"{changed}.tar", f"scores/{changed}.parquet"])
    assert verify(tmp_path / "v2") == []


def test_a_refilter_rewrites_the_samples_of_a_parent_of_another_sample_schema(small_manifest, fake_model, tmp_path,
                                                                              monkeypatch):
    """A parent made before the published sample schema (no `sample_schema` in its run manifest) holds other
    .json bytes: a re-filter writes each kept sample again instead of copying it, so the version is uniform."""
    from mifa_pipeline.refilter import prepare_refilter, run_refilter
    from mifa_pipeline.shards import ShardFileWriter

    parent = small_manifest(out=tmp_path / "v1")
    build(parent)
    _edit_json(Path(parent.output) / "manifest.json", lambda d: d.pop("sample_schema"))
    copied = []
    real = ShardFileWriter.copy
    monkeypatch.setattr(ShardFileWriter, "copy", lambda self, *a: (copied.append(a[0]), real(self, *a))[1])
    v2 = run_refilter(prepare_refilter(parent.output, ["filter.min_pixel_std=46"], tmp_path / "v2"), "local",
                      progress=False).manifest
    assert copied == [] and v2["counts"]["kept_samples"] > 0 and v2["sample_schema"] == 1
    assert verify(tmp_path / "v2") == []


@pytest.mark.parametrize("damage, named", [
    (lambda o: _flip(o / "train-000001.tar"), "train-000001.tar"),           # copied whole
    (lambda o: _flip(o / "scores" / "train-000002.parquet", 300), "scores/train-000002.parquet"),  # decided from
    (lambda o: _flip(o / "identities.parquet", 300), "identities.parquet"),  # copied as the version's table
    (lambda o: (o / "train-000003.tar").write_bytes((o / "train-000003.tar").read_bytes()[:-1024]), "train-000003.tar"),
], ids=["tar", "scores", "identities", "truncated"])
def test_a_refilter_ships_no_byte_of_a_damaged_parent(small_manifest, fake_model, tmp_path, damage, named):
    """What a re-filter reads or copies from its parent is proven against the parent's published digests
    first: a damaged parent file ends the run in one line naming it, and the new version is never finished."""
    from typer.testing import CliRunner

    from mifa_pipeline.cli import app

    parent = small_manifest(out=tmp_path / "v1")
    build(parent)
    damage(Path(parent.output))
    result = CliRunner().invoke(app, ["filter", str(parent.output), "--set", "filter.min_pixel_std=1.5", "--out",
                                      str(tmp_path / "v2"), "--runner", "local", "--no-progress"])
    assert result.exit_code == 2, result.output
    assert f"{named}:" in result.output and "damaged" in result.output and "Traceback" not in result.output
    v2 = tmp_path / "v2"
    assert not (v2 / "manifest.json").exists() and not (v2 / named).exists()  # the damaged file was not copied


def test_a_parent_recorded_before_blake3_is_proven_by_its_sha256(small_manifest, fake_model, tmp_path):
    """A data set whose run manifest records no BLAKE3 (made before mifa recorded it) is still re-filtered:
    its files are proven by their sha256, a damaged one is still refused, and the new version verifies."""
    from typer.testing import CliRunner

    from mifa_pipeline.cli import app

    parent = small_manifest(out=tmp_path / "v1")
    build(parent)
    out = Path(parent.output)

    def strip(d):
        for entry in d["shards"]:
            for part in (entry, entry["sidecar"], entry["scores"]):
                part.pop("blake3")
        d["identities"].pop("blake3")

    _edit_json(out / "manifest.json", strip)
    run = ["filter", str(out), "--set", "filter.min_pixel_std=1.5", "--runner", "local", "--no-progress", "--out"]
    assert CliRunner().invoke(app, [*run, str(tmp_path / "v2")]).exit_code == 0
    assert verify(tmp_path / "v2") == []
    _flip(out / "train-000001.tar")
    result = CliRunner().invoke(app, [*run, str(tmp_path / "v3")])
    assert result.exit_code == 2 and "train-000001.tar:" in result.output and "sha256" in result.output, result.output


def test_the_local_pool_overlaps_two_calls_and_starts_none_after_a_failure():
    """A worker allowing two calls at once gets two (a build generates a shard while it writes the one before);
    results come in completion order; after a failure the call under way finishes and no new one starts."""
    import threading

    from mifa_pipeline.executors import LocalExecutor, WorkerSpec

    class Worker:
        def __init__(self, log):
            self.log, self.running, self.most = log, 0, 0
            self.lock = threading.Lock()

        def make(self, item):
            with self.lock:
                self.running += 1
                self.most = max(self.most, self.running)
            self.log.append(("start", item))
            time.sleep(0.2 if item == 0 else 0.02)
            with self.lock:
                self.running -= 1
            self.log.append(("end", item))
            if item == 3:
                raise ValueError("item 3 failed")
            return item * 10

    log = []
    pool = LocalExecutor().workers(WorkerSpec(Worker, (log,), concurrency=2))
    got = list(pool.run("make", [0, 1, 2]))
    assert sorted(got) == [(0, 0), (1, 10), (2, 20)] and got[0] == (1, 10)  # item 1 ended first
    assert pool.worker.most == 2
    log.clear()
    with pytest.raises(ValueError, match="item 3"):
        list(pool.run("make", [0, 3, 4, 5]))
    started = sorted(item for what, item in log if what == "start")
    assert ("end", 0) in log and started == [0, 3]  # the slow call under way finished; none started after


def test_every_published_file_is_durable_before_the_run_manifest(small_manifest, fake_model, monkeypatch):
    """Shard files are committed without an fsync each (a resume proves them by hash); the run makes every one
    of them durable before `manifest.json` publishes it, and the published run-level files are fsynced too."""
    import os

    m = small_manifest()
    synced: list[str] = []
    published_at: list[int] = []
    real_fsync, real_link = os.fsync, os.link

    def fsync(fd):
        synced.append(os.path.realpath(f"/proc/self/fd/{fd}"))
        return real_fsync(fd)

    def link(src, dst, *a, **k):
        if os.path.basename(dst) == "manifest.json":
            published_at.append(len(synced))
        return real_link(src, dst, *a, **k)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "link", link)
    result = build(m).manifest
    out = os.path.realpath(m.output)
    files = [f for s in result["shards"] for f in (s["path"], s["sidecar"]["path"], s["scores"]["path"])]
    before = set(synced[:published_at[0]])
    assert [f for f in files if os.path.join(out, f) not in before] == []
    assert out in before  # and the folder, for the renames
    assert any(p.startswith(os.path.join(out, ".identities.parquet.tmp-")) for p in before)  # fsynced, then renamed
