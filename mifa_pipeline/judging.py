"""Raw scores from the independent face models (`mifa_pipeline.faces`), one judge per concern.

A judge is a model whose outputs are stored per sample as *raw scores*: `face` (detector: face_count,
face_fraction, face_score), `identity` (embedder: identity_cosine, plus each reference's embedding) and
`au` (estimator: au_est_<AU>). Thresholds never enter raw scores, so re-deciding with other thresholds
runs no model. Each judge has a fingerprint (its model file's sha256, its options, and the fingerprint of
the face judge it aligns with): a re-filter recomputes exactly the judges whose fingerprint changed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mifa_pipeline.config import FilterSection, canonical_json, sha256_text

JUDGES = ("face", "identity", "au")
JUDGE_MIN_SIDE = 192  # face models are trained on faces far larger than a 64 px sample's


@dataclass(frozen=True)
class JudgeSpec:
    """Which model file a judge uses, and its fingerprint; cheap to compute (hashes files, loads nothing)."""

    name: str
    kind: str  # detector / embedder / estimator name
    path: Path | None
    fingerprint: str
    record: dict[str, Any] = field(default_factory=dict)


def _models_dir(cfg: FilterSection) -> Path:
    from mifa_pipeline.faces import default_model_dir

    return Path(cfg.models_dir).expanduser() if cfg.models_dir else default_model_dir()


def _default_path(cfg: FilterSection, judge: str, kind: str) -> Path | None:
    from mifa_pipeline.faces import MODEL_FILES

    defaults = {("face", "yunet"): "yunet", ("identity", "sface"): "sface", ("au", "mediapipe"): "face_landmarker"}
    key = defaults.get((judge, kind))
    return _models_dir(cfg) / MODEL_FILES[key].filename if key else None


class JudgeFileError(FileNotFoundError):
    """A judge that cannot be set up: its model file is missing or its name is unknown."""


def judge_specs(cfg: FilterSection) -> dict[str, JudgeSpec]:
    """The judges a filter config switches on, with their fingerprints; raises JudgeFileError naming the field."""
    from mifa_pipeline.faces import model_record

    specs: dict[str, JudgeSpec] = {}
    chosen = {"face": (cfg.face.detector, cfg.face.path), "identity": (cfg.identity.embedder, cfg.identity.path),
              "au": (cfg.au.estimator, cfg.au.path)}
    for name in JUDGES:
        kind, path = chosen[name]
        if kind == "none":
            continue
        path = Path(path).expanduser() if path else _default_path(cfg, name, kind)
        record: dict[str, Any] = {}
        if path is not None:
            if not path.is_file():
                field_name = {"face": "face.detector", "identity": "identity.embedder", "au": "au.estimator"}[name]
                raise JudgeFileError(f"filter.{field_name}: {kind} needs {path}, which is missing; "
                                     "run scripts/install-face-models.sh or set filter.models_dir / the path")
            record = model_record(path, f"judge:{name}")
        options = {"kind": kind, "sha256": record.get("sha256"), "min_side": JUDGE_MIN_SIDE,
                   "aligned_with": specs["face"].fingerprint if name != "face" else None}
        if name == "au":
            from mifa_pipeline.faces import au_estimator_class

            try:
                estimator = au_estimator_class(kind)
            except (KeyError, ImportError, AttributeError, ValueError, TypeError) as exc:
                raise JudgeFileError(f"filter.au.estimator: {kind!r} is not an AU estimator ({exc}); expected "
                                     "'none', 'mediapipe' or 'package.module:Class'") from None
            options["aus"] = cfg.au.aus
            options["estimator_version"] = getattr(estimator, "version", None)
        specs[name] = JudgeSpec(name, kind, path, sha256_text(canonical_json(options)), record)
    return specs


def upscale_for_judges(image: np.ndarray) -> np.ndarray:
    """Small images are enlarged (bicubic) before judging; ratios such as face_fraction do not change."""
    side = min(image.shape[:2])
    if side >= JUDGE_MIN_SIDE:
        return image
    import cv2

    scale = JUDGE_MIN_SIDE / side
    return cv2.resize(image, (round(image.shape[1] * scale), round(image.shape[0] * scale)), interpolation=cv2.INTER_CUBIC)


class Judges:
    """The loaded models of some judges; `score` fills raw scores for a unit's samples and references."""

    def __init__(self, cfg: FilterSection, specs: dict[str, JudgeSpec], run: set[str] | None = None):
        from mifa_pipeline import faces

        self.specs = specs
        self.run = set(specs) if run is None else set(run) & set(specs)
        needs_faces = self.run | ({"face"} if self.run else set())
        self.detector = self.embedder = self.estimator = None
        if "face" in needs_faces and "face" in specs:
            self.detector = faces.DETECTORS[specs["face"].kind](specs["face"].path)
        if "identity" in self.run:
            spec = specs["identity"]
            self.embedder = (faces.sface_embedder(spec.path) if spec.kind == "sface"
                             else faces.ArcFaceEmbedder(spec.path))
        if "au" in self.run:
            spec = specs["au"]
            options: dict[str, Any] = {"model_path": spec.path} if spec.path else {}
            if cfg.au.aus:
                options["aus"] = tuple(cfg.au.aus)
            self.estimator = faces.build_au_estimator(spec.kind, **options)

    def _best_face(self, image: np.ndarray):
        faces = self.detector.detect(image)
        return faces, (max(faces, key=lambda f: float(np.prod(f.xywh[2:]))) if faces else None)

    def count_faces(self, image: np.ndarray) -> int:
        """Faces the face judge finds in an image (enlarged as for judging)."""
        return len(self.detector.detect(upscale_for_judges(image)))

    def reference_embeddings(self, references: dict[int, np.ndarray]) -> dict[int, list[float] | None]:
        out: dict[int, list[float] | None] = {}
        for identity, image in references.items():
            image = upscale_for_judges(image)
            _, face = self._best_face(image)
            out[identity] = None if face is None else [float(v) for v in self.embedder.embed(image, face)]
        return out

    def score(self, image: np.ndarray, reference_embedding: list[float] | None) -> dict[str, Any]:
        """Raw scores of the judges in `self.run` for one generated image."""
        image = upscale_for_judges(image)
        faces, face = self._best_face(image)
        scores: dict[str, Any] = {}
        if "face" in self.run:
            area = float(image.shape[0] * image.shape[1])
            scores.update({
                "face_count": len(faces),
                "face_fraction": None if face is None else round(float(np.prod(face.xywh[2:])) / area, 5),
                "face_score": None if face is None else round(float(face.score), 5),
            })
        if "identity" in self.run:
            cosine = None
            if face is not None and reference_embedding is not None:
                cosine = round(float(np.dot(self.embedder.embed(image, face), np.asarray(reference_embedding))), 5)
            scores["identity_cosine"] = cosine
        if "au" in self.run:
            estimate = self.estimator.estimate(image, face) if face is not None else {}
            for au in self.estimator.aus:
                value = estimate.get(au)
                scores[f"au_est_{au}"] = None if value is None else round(float(value), 5)
        # a judge's NaN/inf (a degenerate image) is "no score": stored JSON stays JSON
        return {k: None if isinstance(v, float) and not np.isfinite(v) else v for k, v in scores.items()}

    def close(self) -> None:
        if self.estimator is not None:
            self.estimator.close()


def raw_keys(judge: str, scores: dict[str, Any]) -> list[str]:
    """The stored score keys a judge produced (to keep them on reuse, drop them on recompute)."""
    if judge == "face":
        return [k for k in ("face_count", "face_fraction", "face_score") if k in scores]
    if judge == "identity":
        return [k for k in ("identity_cosine",) if k in scores]
    return [k for k in scores if k.startswith("au_est_")]
