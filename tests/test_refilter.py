"""`mifa filter`: new versions from stored scores; only changed judges run; the parent stays intact."""

import hashlib
import json
from pathlib import Path

import pytest

from mifa_pipeline.faces import MODEL_FILES, default_model_dir, models_available
from mifa_pipeline.refilter import prepare_refilter, run_refilter
from mifa_pipeline.runner import BuildError, build_data, prepare
from mifa_pipeline.verify import verify

pytestmark = pytest.mark.skipif(not models_available(), reason="run scripts/install-face-models.sh (make setup does)")
JUDGED = ["model.checkpoint=teacher", "sampler.resolution=128", "filter.face.detector=yunet",
          "filter.identity.embedder=sface", "filter.au.estimator=mediapipe"]


def tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def judged_build(tmp_path_factory):
    """A teacher build (real faces) scored by YuNet, SFace and MediaPipe: 4 identities x 3 samples."""
    from mifa_pipeline.config import load_manifest

    out = tmp_path_factory.mktemp("b") / "v1"
    m = load_manifest(None, [*JUDGED, "identities.count=4", "identities.samples_per_identity=3",
                             "resources.identities_per_unit=2", "writer.samples_per_shard=5"], output=out)
    build_data(prepare(m), "local", progress=False)
    return out


def refilter(parent, *sets, out=None):
    return run_refilter(prepare_refilter(parent, list(sets), out), "local", progress=False).manifest


def test_build_stores_every_judge_score(judged_build):
    meta = json.loads((judged_build / "manifest.json").read_text())
    roles = sorted(f["role"] for f in meta["models"])
    assert roles == ["judge:au", "judge:face", "judge:identity"]
    assert all(len(f["sha256"]) == 64 and f["license"] for f in meta["models"])
    import pyarrow.parquet as pq

    rows = pq.read_table(judged_build / "train-000000.parquet").to_pylist()
    for row in rows:
        assert row["scores_face_count"] == 1
        assert row["scores_identity_cosine"] > 0.5  # same rendered person as the reference
        assert 0 <= row["scores_au_agreement"] <= 1 and row["scores_au_est_AU12_valid"]
        assert row["scores_identity_nearest_earlier_cosine_valid"] == (row["identity"] > 0)


def test_threshold_only_refilter_runs_no_model_and_leaves_the_parent_intact(judged_build, tmp_path, monkeypatch):
    before = tree_digest(judged_build)

    def no_model(*args, **kwargs):
        raise AssertionError("a threshold-only re-filter must not load a face model")

    monkeypatch.setattr("mifa_pipeline.refilter.Judges", no_model)
    monkeypatch.setattr("mifa_pipeline.refilter.decode_image", no_model)  # no image is decoded either
    c = refilter(judged_build, "filter.identity.min_cosine=0.999", out=tmp_path / "v2")
    parent = json.loads((judged_build / "manifest.json").read_text())
    assert c["kind"] == "mifa-filter" and c["dataset"]["version"] == "1.1.0"
    assert c["parent"]["fingerprint"] == parent["fingerprint"] and c["fingerprint"] != parent["fingerprint"]
    assert c["stages"]["filter"]["rescored_judges"] == []
    assert c["stages"]["filter"]["in"] == 12
    assert c["counts"]["kept_samples"] < parent["counts"]["kept_samples"]
    assert c["stages"]["filter"]["dropped"].get("identity_mismatch", 0) == 12 - c["counts"]["kept_samples"]
    assert c["stages"]["generate"] == parent["stages"]["generate"]
    assert verify(tmp_path / "v2") == [] and verify(judged_build) == []
    assert tree_digest(judged_build) == before
    # kept images are the parent's tar members, byte for byte (nothing re-encoded)
    import webdataset as wds

    parent_images = {s["__key__"]: s["png"] for s in wds.WebDataset(str(judged_build / "train-*.tar").replace("*", "{000000..000002}"), shardshuffle=False)}
    for tar in sorted((tmp_path / "v2").glob("*.tar")):
        for sample in wds.WebDataset(str(tar), shardshuffle=False, empty_check=False):
            assert sample["png"] == parent_images[sample["__key__"]]
    # the same command again: already complete, nothing rewritten
    assert prepare_refilter(judged_build, ["filter.identity.min_cosine=0.999"], tmp_path / "v2").state == "complete"


def test_a_changed_judge_rescores_only_what_it_produces(judged_build, tmp_path):
    # SFace's patched copy: same network, another file (sha256), so the identity judge must run again
    from mifa_pipeline.faces.registry import SFACE_PATCHED_FILENAME

    patched = default_model_dir() / SFACE_PATCHED_FILENAME
    assert patched.is_file() and patched.name != MODEL_FILES["sface"].filename
    c = refilter(judged_build, f"filter.identity.path={patched}", out=tmp_path / "v2")
    assert c["stages"]["filter"]["rescored_judges"] == ["identity"]
    import pyarrow.parquet as pq

    old = {r["key"]: r for r in pq.read_table(judged_build / "train-000000.parquet").to_pylist()}
    for row in pq.read_table(tmp_path / "v2" / "train-000000.parquet").to_pylist():
        before = old[row["key"]]
        assert row["scores_au_est_AU12"] == before["scores_au_est_AU12"]  # reused, not recomputed
        assert row["scores_identity_cosine"] == pytest.approx(before["scores_identity_cosine"], abs=0.02)
        assert row["image_sha256"] == before["image_sha256"]  # nothing regenerated
    assert verify(tmp_path / "v2") == []


def test_refilter_refuses_non_filter_changes_and_its_parent_folder(judged_build):
    with pytest.raises(BuildError, match="changes only filter"):
        prepare_refilter(judged_build, ["sampler.steps=3"])
    with pytest.raises(BuildError, match="needs its own folder"):
        prepare_refilter(judged_build, ["filter.min_pixel_std=3"], judged_build)
    with pytest.raises(BuildError, match="nowhere: does not exist"):
        prepare_refilter(judged_build / "nowhere", [])


def test_filter_stage_with_real_photos_drops_no_face_and_several_faces_with_reasons():
    """The filter stage itself, fed real photos: one face kept, six faces and a faceless image dropped."""
    import numpy as np
    import skimage.data
    from PIL import Image

    import insightface
    from mifa_pipeline.config import FilterSection
    from mifa_pipeline.judging import Judges, judge_specs
    from mifa_pipeline.records import IdentityRecord, SampleRecord
    from mifa_pipeline.stages.filter import Filtering

    size = 256
    astronaut = np.asarray(Image.fromarray(skimage.data.astronaut()).resize((size, size)))
    group_path = Path(insightface.__file__).parent / "data" / "images" / "t1.jpg"
    group = np.asarray(Image.open(group_path).convert("RGB").resize((size, size)))
    sky = np.asarray(Image.fromarray(skimage.data.astronaut()[:120, 300:420]).resize((size, size)))  # no face
    cfg = FilterSection(face={"detector": "yunet", "min_fraction": 0.01}, identity={"embedder": "sface"},
                        au={"estimator": "mediapipe"})
    person = IdentityRecord(0, 0, {}, "", reference=np.ascontiguousarray(astronaut[:, ::-1]))
    aus = {"AU12": 3, "AU25": 2}
    samples = [SampleRecord(0, i, 0, requested=aus, image=img, occurrence_prob={a: 0.9 for a in aus},
                            intensity={a: 3.0 for a in aus}) for i, img in enumerate([astronaut, group, sky])]
    judges = Judges(cfg, judge_specs(cfg))
    out, stats = Filtering(cfg, size, judges).run(samples, {0: person})
    judges.close()
    kept, several, none = out
    assert kept.keep and kept.scores["face_count"] == 1
    assert kept.scores["identity_cosine"] > 0.8  # the astronaut vs her mirror image
    assert kept.scores["au_est_AU12"] > 0.5  # she smiles
    assert several.drop_reason == "multiple_faces" and several.scores["face_count"] > 1
    assert none.drop_reason == "no_face" and none.scores["identity_cosine"] is None
    assert stats.dropped == {"multiple_faces": 1, "no_face": 1}


def test_a_new_au_estimator_version_changes_only_the_au_fingerprint(tmp_path, monkeypatch):
    """Same model file, other formulas (e.g. AU6 moved to landmarks): `mifa filter` must re-score the AUs."""
    from mifa_pipeline.config import FilterSection
    from mifa_pipeline.faces.au_estimate import MediaPipeBlendshapeAU
    from mifa_pipeline.judging import judge_specs

    for key in ("yunet", "face_landmarker"):
        (tmp_path / MODEL_FILES[key].filename).write_bytes(key.encode())  # judge_specs only hashes files
    cfg = FilterSection.model_validate({"models_dir": str(tmp_path), "face": {"detector": "yunet"},
                                        "au": {"estimator": "mediapipe"}})
    before = judge_specs(cfg)
    monkeypatch.setattr(MediaPipeBlendshapeAU, "version", "next")
    after = judge_specs(cfg)
    assert after["face"].fingerprint == before["face"].fingerprint
    assert after["au"].fingerprint != before["au"].fingerprint
