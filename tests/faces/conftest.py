"""Shared fixtures for the face-model tests: real photos and the offline model files.

The model files come from `scripts/install-face-models.sh` (CI runs it before pytest). When they are
absent the model tests skip with that instruction; the fetch/checksum tests need no model files.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mifa_pipeline.faces.registry import default_model_dir

MISSING = "face model files absent: run scripts/install-face-models.sh (or set MIFA_FACE_MODELS)"


def _model_dir() -> Path:
    return default_model_dir()


@pytest.fixture(scope="session")
def model_dir() -> Path:
    from mifa_pipeline.faces.models import models_available

    if not models_available(_model_dir()):
        pytest.skip(MISSING)
    return _model_dir()


@pytest.fixture(scope="session")
def astronaut() -> np.ndarray:
    import skimage.data

    return np.ascontiguousarray(skimage.data.astronaut())


def _insightface_image(name: str) -> np.ndarray:
    import cv2
    import insightface

    path = Path(insightface.__file__).parent / "data" / "images" / name
    image = cv2.imread(str(path))
    assert image is not None, f"insightface's sample image {path} is missing"
    return np.ascontiguousarray(image[:, :, ::-1])


@pytest.fixture(scope="session")
def t1() -> np.ndarray:
    """insightface's sample photo: six people around a table (RGB)."""
    return _insightface_image("t1.jpg")


@pytest.fixture(scope="session")
def hanks() -> np.ndarray:
    """insightface's second sample: one aligned 112x112 face of another person (RGB)."""
    return _insightface_image("Tom_Hanks_54745.png")


@pytest.fixture(scope="session")
def detector(model_dir):
    from mifa_pipeline.faces.detect import YuNetDetector
    from mifa_pipeline.faces.registry import MODEL_FILES

    return YuNetDetector(model_dir / MODEL_FILES["yunet"].filename)


@pytest.fixture(scope="session")
def embedder(model_dir):
    from mifa_pipeline.faces.identity import sface_embedder
    from mifa_pipeline.faces.registry import MODEL_FILES

    return sface_embedder(model_dir / MODEL_FILES["sface"].filename)


@pytest.fixture(scope="session")
def au_estimator(model_dir):
    pytest.importorskip("mediapipe", reason="mediapipe absent: run scripts/install-face-models.sh")
    from mifa_pipeline.faces.au_estimate import MediaPipeBlendshapeAU
    from mifa_pipeline.faces.registry import MODEL_FILES

    estimator = MediaPipeBlendshapeAU(model_dir / MODEL_FILES["face_landmarker"].filename)
    yield estimator
    estimator.close()


@pytest.fixture(scope="session")
def t1_faces(detector, t1):
    """t1.jpg's faces, left to right in the picture."""
    return sorted(detector.detect(t1), key=lambda f: float(f.bbox[0]))

