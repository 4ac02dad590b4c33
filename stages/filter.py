"""Stage 4, filtering: score every sample, then keep it or drop it with a reason.

Scoring and deciding are separate on purpose: scores are stored for every sample (kept or not), so a
curator can re-decide with other thresholds without running any model again (`decide` alone).
Checks here: the image is valid and not blank, the labels are finite and in range, and, when a face
detector is configured, exactly one face of a sensible size is found. Identity and AU consistency
scores from independent face models plug in through `scorers`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from mifa_pipeline.config import FilterSection
from mifa_pipeline.records import IdentityRecord, SampleRecord, StageStats

# A scorer adds named scores for a sample, given its identity record (e.g. identity cosine, AU agreement).
Scorer = Callable[[SampleRecord, IdentityRecord], dict[str, Any]]
# A face detector returns one (x, y, w, h, score) tuple per face found in an RGB uint8 image.
FaceDetector = Callable[[np.ndarray], list[tuple[float, float, float, float, float]]]


def image_scores(image: np.ndarray | None, resolution: int) -> dict[str, Any]:
    if image is None or image.dtype != np.uint8 or image.ndim != 3 or image.shape != (resolution, resolution, 3):
        return {"image_valid": False, "pixel_std": None}
    return {"image_valid": True, "pixel_std": round(float(image.std()), 4)}


def label_scores(sample: SampleRecord) -> dict[str, Any]:
    """Labels in range, and how far the generated intensities are from those the prompt asked for."""
    prob = list(sample.occurrence_prob.values())
    inten = list(sample.intensity.values())
    ok = (
        len(prob) == len(sample.requested) == len(inten)
        and all(math.isfinite(p) and 0.0 <= p <= 1.0 for p in prob)
        and all(math.isfinite(v) and 0.0 <= v <= 5.0 for v in inten)
    )
    mae = None
    if ok:
        mae = round(float(np.mean([abs(sample.intensity[a] - v) for a, v in sample.requested.items()])), 5)
    return {"labels_in_range": ok, "au_mae_requested": mae}


def face_scores(image: np.ndarray, detector: FaceDetector | None) -> dict[str, Any]:
    if detector is None:  # recorded as "not checked", never as a pass
        return {"face_count": None, "face_fraction": None, "face_score": None}
    faces = detector(image)
    area = float(image.shape[0] * image.shape[1])
    biggest = max(faces, key=lambda f: f[2] * f[3], default=None)
    return {
        "face_count": len(faces),
        "face_fraction": None if biggest is None else round(biggest[2] * biggest[3] / area, 5),
        "face_score": None if biggest is None else round(float(biggest[4]), 5),
    }


def decide(scores: dict[str, Any], config: FilterSection) -> str | None:
    """The drop reason for a sample's scores, or None to keep it. Runs no model."""
    if not scores.get("image_valid"):
        return "invalid_image"
    if scores["pixel_std"] < config.min_pixel_std:
        return "blank_image"
    if not scores.get("labels_in_range"):
        return "labels_out_of_range"
    count = scores.get("face_count")
    if count is not None:
        if count == 0:
            return "no_face"
        if count > 1:
            return "multiple_faces"
        if scores["face_fraction"] < config.min_face_fraction:
            return "face_too_small"
    return None


class Filtering:
    name = "filter"
    version = "1"

    def __init__(self, config: FilterSection, resolution: int, detector: FaceDetector | None = None,
                 scorers: list[Scorer] = ()):
        self.config = config
        self.resolution = resolution
        self.detector = detector
        self.scorers = list(scorers)

    def score(self, sample: SampleRecord, person: IdentityRecord) -> dict[str, Any]:
        scores = image_scores(sample.image, self.resolution)
        scores.update(label_scores(sample))
        if scores["image_valid"]:
            scores.update(face_scores(sample.image, self.detector))
            for scorer in self.scorers:
                scores.update(scorer(sample, person))
        return scores

    def run(self, samples: list[SampleRecord], people: dict[int, IdentityRecord]) -> tuple[list[SampleRecord], StageStats]:
        start = time.perf_counter()
        stats = StageStats(self.name, self.version, n_in=len(samples))
        for sample in samples:
            sample.scores = self.score(sample, people[sample.identity])
            sample.drop_reason = decide(sample.scores, self.config)
            sample.keep = sample.drop_reason is None
            if sample.keep:
                stats.n_out += 1
            else:
                stats.drop(sample.drop_reason)
        stats.seconds = time.perf_counter() - start
        return samples, stats
