"""The bundle: built from a plain dict, loads all three judges, records path/sha256/license per file."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import mifa_pipeline.faces as faces
from mifa_pipeline.faces.models import FaceModelsConfig, build_face_models
from mifa_pipeline.faces.registry import MODEL_FILES


def test_config_from_plain_dict_rejects_unknown_keys():
    cfg = FaceModelsConfig.from_dict({"detector": "yunet", "au_estimator_options": {"crop_scale": 2.0}})
    assert cfg.detector == "yunet" and cfg.au_estimator_options == {"crop_scale": 2.0}
    assert FaceModelsConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(KeyError, match="detektor"):
        FaceModelsConfig.from_dict({"detektor": "yunet"})


def test_scrfd_needs_a_user_model_path():
    with pytest.raises(ValueError, match="detector_path"):
        build_face_models({"detector": "scrfd"})


@pytest.fixture(scope="module")
def bundle(model_dir):
    pytest.importorskip("mediapipe", reason="mediapipe absent: run scripts/install-face-models.sh")
    models = build_face_models({"model_dir": str(model_dir)})
    yield models
    models.close()


def test_bundle_judges_a_real_photo(bundle, astronaut):
    faces_found = bundle.detect(astronaut)
    assert len(faces_found) == 1
    emb = bundle.embed(astronaut, faces_found[0])
    assert emb.shape == (bundle.embedder.dim,)
    assert bundle.estimate_aus(astronaut, faces_found[0])["AU12"] > 0.6


def test_records_carry_path_sha256_and_license(bundle):
    records = {r["role"]: r for r in bundle.records()}
    assert set(records) == {"detector", "embedder", "au_estimator"}
    assert records["detector"]["sha256"] == MODEL_FILES["yunet"].sha256
    assert records["detector"]["license"] == "MIT" and records["detector"]["matches_pinned_sha256"]
    assert records["au_estimator"]["sha256"] == MODEL_FILES["face_landmarker"].sha256
    assert records["au_estimator"]["license"] == "Apache-2.0"
    emb = records["embedder"]
    assert emb["license"] == "Apache-2.0" and emb["derived_from"]["sha256"] == MODEL_FILES["sface"].sha256
    assert Path(emb["path"]).is_file() and len(emb["sha256"]) == 64


def test_user_license_overrides_unknown(model_dir, tmp_path):
    import shutil

    own = tmp_path / "my_detector.onnx"
    shutil.copy(model_dir / MODEL_FILES["yunet"].filename, own)
    record = faces.model_record(own, "detector")
    assert record["license"] == "unknown" and record["matches_pinned_sha256"] is None
    assert faces.model_record(own, "detector", "CC-BY-4.0")["license"] == "CC-BY-4.0"


def test_faces_imports_nothing_of_maugen():
    for path in Path(faces.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                names = [("." * node.level) + (node.module or "")]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            assert not any("maugen" in n for n in names), f"{path.name} imports {names}"
