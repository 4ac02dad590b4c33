"""Stage 4, filtering: score every sample, then keep it or drop it with a reason.

Three kinds of numbers, kept apart so a curator can re-decide without running a model:
- raw scores, stored per sample: image checks (`image_valid`, `pixel_std`), label checks (`labels_in_range`,
  `au_mae_requested`: mean |generated - requested| intensity), and the judges' outputs (`face_count`,
  `face_fraction`, `face_score`, `identity_cosine`: generated face vs its identity's reference,
  `au_est_<AU>`: the independent estimate, a 0..1 proxy, None where the estimator has no proxy);
- derived scores, recomputed from raw ones and thresholds (`derived_scores`): `au_agree_<AU>` is 1 when the
  estimate says the AU is shown (>= au.present_threshold) exactly when the prompt asked for it (intensity
  >= 2, the DISFA protocol), `au_agreement` their mean over the counted AUs (request vs independent
  estimate), `au_agreement_labels` the same with MAUGen's own occurrence (p >= 0.5) in place of the request;
- the decision (`decide`): None to keep, else the first failing check's reason.
The judges (face models) are injected; this module loads no model.
"""

from __future__ import annotations

import math
import time
from typing import Any, Protocol

import numpy as np

from mifa_pipeline.config import FilterSection
from mifa_pipeline.records import IdentityRecord, SampleRecord, StageStats

REQUESTED_PRESENT = 2  # FACS intensity from which the prompt counts an AU as present (DISFA protocol)


class JudgeModels(Protocol):
    run: set[str]

    def reference_embeddings(self, references: dict[int, np.ndarray]) -> dict[int, list[float] | None]: ...

    def score(self, image: np.ndarray, reference_embedding: list[float] | None) -> dict[str, Any]: ...


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


def derived_scores(raw: dict[str, Any], requested: dict[str, int], occurrence_prob: dict[str, float],
                   config: FilterSection) -> dict[str, Any]:
    """AU agreement from the stored estimates; thresholds only, no model."""
    estimates = {k.removeprefix("au_est_"): v for k, v in raw.items() if k.startswith("au_est_")}
    if not estimates:
        return {}
    counted = [au for au in (config.au.aus or estimates) if estimates.get(au) is not None and au in requested]
    out: dict[str, Any] = {}
    vs_request, vs_labels = [], []
    for au in counted:
        shown = estimates[au] >= config.au.present_threshold
        agree = int(shown == (requested[au] >= REQUESTED_PRESENT))
        out[f"au_agree_{au}"] = agree
        vs_request.append(agree)
        vs_labels.append(int(shown == (occurrence_prob.get(au, 0.0) >= 0.5)))
    out["au_agreement"] = round(float(np.mean(vs_request)), 5) if counted and raw.get("face_count") else None
    out["au_agreement_labels"] = round(float(np.mean(vs_labels)), 5) if counted and raw.get("face_count") else None
    return out


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
        if scores["face_fraction"] < config.face.min_fraction:
            return "face_too_small"
    threshold = config.identity.min_cosine
    cosine = scores.get("identity_cosine")
    if threshold is not None and "identity_cosine" in scores and (cosine is None or cosine < threshold):
        return "identity_mismatch"
    agreement = scores.get("au_agreement")
    if config.au.min_agreement is not None and agreement is not None and agreement < config.au.min_agreement:
        return "au_inconsistent"
    if config.au.max_label_mae is not None and scores["au_mae_requested"] > config.au.max_label_mae:
        return "labels_off_request"
    return None


def redecide(raw: dict[str, Any], requested: dict[str, int], occurrence_prob: dict[str, float],
             config: FilterSection) -> tuple[dict[str, Any], str | None]:
    """Raw scores -> (all scores, drop reason): what a threshold-only re-filter runs for each sample."""
    scores = {k: v for k, v in raw.items() if not k.startswith(("au_agree", "au_agreement"))}
    scores.update(derived_scores(scores, requested, occurrence_prob, config))
    return scores, decide(scores, config)


class Filtering:
    name = "filter"
    version = "2"

    def __init__(self, config: FilterSection, resolution: int, judges: JudgeModels | None = None):
        self.config = config
        self.resolution = resolution
        self.judges = judges

    def run(self, samples: list[SampleRecord], people: dict[int, IdentityRecord]) -> tuple[list[SampleRecord], StageStats]:
        start = time.perf_counter()
        stats = StageStats(self.name, self.version, n_in=len(samples))
        if self.judges is not None and "identity" in self.judges.run:  # references not embedded before
            missing = {i: p.reference for i, p in people.items() if p.embedding is None}
            for i, embedding in (self.judges.reference_embeddings(missing) if missing else {}).items():
                people[i].embedding = embedding
        for sample in samples:
            raw = image_scores(sample.image, self.resolution)
            raw.update(label_scores(sample))
            if raw["image_valid"] and self.judges is not None and self.judges.run:
                raw.update(self.judges.score(sample.image, people[sample.identity].embedding))
            sample.scores, sample.drop_reason = redecide(raw, sample.requested, sample.occurrence_prob, self.config)
            sample.keep = sample.drop_reason is None
            if sample.keep:
                stats.n_out += 1
            else:
                stats.drop(sample.drop_reason)
        stats.seconds = time.perf_counter() - start
        return samples, stats
