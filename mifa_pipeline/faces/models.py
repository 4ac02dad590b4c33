"""Build detector + identity embedder + AU estimator from one plain config, and say what they loaded.

The filter stage gets one object; the run manifest gets `records()`: path, sha256 and license of every
model file, so a data set says which weights judged it. Paths default to the fetched offline files.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from .au_estimate import AUEstimator, build_au_estimator
from .detect import DETECTORS, Face, FaceDetector
from .identity import ArcFaceEmbedder
from .registry import MODEL_FILES, SFACE_PATCHED_FILENAME, default_model_dir, model_record


@dataclass
class FaceModelsConfig:
    """Names and paths only (no pydantic): `FaceModelsConfig.from_dict(section)` takes a plain dict.

    Empty paths mean the offline defaults in `model_dir` (YuNet, patched SFace, face_landmarker.task).
    `licenses` maps a role ("detector", "embedder", "au_estimator") to a license string for user files.
    """

    model_dir: str | None = None
    detector: str = "yunet"  # "yunet" | "scrfd"
    detector_path: str | None = None
    detector_options: dict[str, Any] = field(default_factory=dict)
    embedder_path: str | None = None
    # None: SFace's 0/1 when the default SFace is used, else what insightface infers from the graph.
    embedder_input_mean: float | None = None
    embedder_input_std: float | None = None
    au_estimator: str = "mediapipe"  # a registered name or "module:Class"
    au_estimator_options: dict[str, Any] = field(default_factory=dict)
    licenses: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None) -> "FaceModelsConfig":
        values = dict(values or {})
        unknown = set(values) - {f.name for f in fields(cls)}
        if unknown:
            raise KeyError(f"unknown face model settings: {sorted(unknown)}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class FaceModels:
    """The three judges together. Images are RGB uint8 throughout."""

    def __init__(self, detector: FaceDetector, embedder: ArcFaceEmbedder, au_estimator: AUEstimator,
                 licenses: dict[str, str] | None = None):
        self.detector = detector
        self.embedder = embedder
        self.au_estimator = au_estimator
        self.licenses = dict(licenses or {})

    def detect(self, image: np.ndarray) -> list[Face]:
        return self.detector.detect(image)

    def embed(self, image: np.ndarray, face: Face) -> np.ndarray:
        return self.embedder.embed(image, face)

    def estimate_aus(self, image: np.ndarray, face: Face | None = None) -> dict[str, float | None]:
        return self.au_estimator.estimate(image, face)

    def records(self) -> list[dict]:
        """One manifest record (role, path, sha256, license, ...) per model file in use."""
        out = []
        for role, model in (("detector", self.detector), ("embedder", self.embedder),
                            ("au_estimator", self.au_estimator)):
            path = getattr(model, "model_path", None)
            if path is not None:
                record = model_record(path, role, self.licenses.get(role))
                record["component"] = getattr(model, "name", type(model).__name__)
                out.append(record)
        return out

    def describe(self) -> dict:
        return {"embedder": self.embedder.describe(), "au_estimator": self.au_estimator.describe(),
                "detector": getattr(self.detector, "name", type(self.detector).__name__)}

    def close(self) -> None:
        self.au_estimator.close()


def build_face_models(config: FaceModelsConfig | dict[str, Any] | None = None) -> FaceModels:
    """Load the models named by `config` (a FaceModelsConfig, a plain dict, or None for all defaults)."""
    if not isinstance(config, FaceModelsConfig):
        config = FaceModelsConfig.from_dict(config)
    root = Path(config.model_dir).expanduser() if config.model_dir else default_model_dir()

    if config.detector not in DETECTORS:
        raise KeyError(f"unknown detector {config.detector!r}; known: {sorted(DETECTORS)}")
    if config.detector_path is None and config.detector != "yunet":
        raise ValueError(f"detector {config.detector!r} needs detector_path (no offline default)")
    det_path = config.detector_path or root / MODEL_FILES["yunet"].filename
    detector = DETECTORS[config.detector](det_path, **config.detector_options)

    mean, std = config.embedder_input_mean, config.embedder_input_std
    if config.embedder_path is None:
        emb_path = root / SFACE_PATCHED_FILENAME
        if not emb_path.is_file():  # the loader patches a plain SFace itself
            emb_path = root / MODEL_FILES["sface"].filename
    else:
        emb_path = Path(config.embedder_path).expanduser()
    if emb_path.name in (SFACE_PATCHED_FILENAME, MODEL_FILES["sface"].filename):
        # SFace normalises inside its graph; insightface's default 127.5 would squash identities.
        mean = 0.0 if mean is None else mean
        std = 1.0 if std is None else std
    embedder = ArcFaceEmbedder(emb_path, input_mean=mean, input_std=std)

    options = dict(config.au_estimator_options)
    if config.au_estimator == "mediapipe":
        options.setdefault("model_path", root / MODEL_FILES["face_landmarker"].filename)
    au_estimator = build_au_estimator(config.au_estimator, **options)
    return FaceModels(detector, embedder, au_estimator, config.licenses)


def models_available(model_dir: str | os.PathLike | None = None) -> bool:
    """Whether the offline default files are all present in `model_dir` (by name, not by digest)."""
    root = Path(model_dir) if model_dir else default_model_dir()
    return all((root / entry.filename).is_file() for entry in MODEL_FILES.values())
