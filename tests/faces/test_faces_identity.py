"""Identity: SFace through insightface's own loader separates the same person from other people."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from mifa_pipeline.faces.identity import ArcFaceEmbedder, cosine, stale_inputs


def _views(detector, astronaut):
    """The astronaut as she is, mirrored, cropped, and shrunk: the same person four times."""
    import cv2

    views = [astronaut, astronaut[:, ::-1], astronaut[20:300, 120:400],
             cv2.resize(astronaut, (320, 320), interpolation=cv2.INTER_AREA)]
    out = []
    for view in views:
        view = np.ascontiguousarray(view)
        faces = detector.detect(view)
        assert len(faces) == 1
        out.append((view, faces[0]))
    return out


@pytest.fixture(scope="module")
def same_and_different(detector, embedder, astronaut, t1, t1_faces, hanks):
    same = [embedder.embed(img, face) for img, face in _views(detector, astronaut)]
    others = list(embedder.embed_many(t1, t1_faces)) + [embedder.embed_aligned(hanks)]
    return same, others


def test_embedding_size_comes_from_the_model(embedder):
    out = embedder.model.session.get_outputs()[0].shape[-1]
    assert embedder.dim == out == 128  # SFace; an R50 pack would give 512 with no code change


def test_embeddings_are_unit_vectors(same_and_different):
    same, others = same_and_different
    for e in same + others:
        assert e.dtype == np.float32 and abs(np.linalg.norm(e) - 1) < 1e-4


def test_same_person_scores_above_different_people(same_and_different):
    same, others = same_and_different
    same_sims = [cosine(a, b) for a, b in itertools.combinations(same, 2)]
    astronaut_vs_others = [cosine(same[0], o) for o in others]
    others_vs_others = [cosine(a, b) for a, b in itertools.combinations(others, 2)]
    assert min(same_sims) > 0.7, same_sims
    assert max(astronaut_vs_others + others_vs_others) < 0.45
    assert min(same_sims) > max(astronaut_vs_others) + 0.3


def test_embed_many_matches_embed(embedder, t1, t1_faces):
    batch = embedder.embed_many(t1, t1_faces)
    assert batch.shape == (6, embedder.dim)
    for row, face in zip(batch, t1_faces):
        np.testing.assert_allclose(row, embedder.embed(t1, face), atol=1e-5)
    assert embedder.embed_many(t1, []).shape == (0, embedder.dim)


def test_sface_needs_both_fixes(model_dir, embedder, t1, t1_faces):
    """The raw file lists 29 inputs nothing consumes; the loader's default 127.5 mean/std merges people."""
    import onnx

    from mifa_pipeline.faces.registry import MODEL_FILES

    raw = onnx.load(str(model_dir / MODEL_FILES["sface"].filename), load_external_data=False)
    assert len(stale_inputs(raw)) == 29
    assert embedder.describe()["input_mean"] == 0.0 and embedder.describe()["input_std"] == 1.0
    default_norm = ArcFaceEmbedder(embedder.model_path)  # insightface's own guess: 127.5 / 127.5
    assert default_norm.model.input_mean == 127.5

    def worst_pair(e):
        sims = e @ e.T
        return float(np.max(sims - 2 * np.eye(len(e))))

    assert worst_pair(embedder.embed_many(t1, t1_faces)) < 0.45
    assert worst_pair(default_norm.embed_many(t1, t1_faces)) > 0.8


def test_cosine():
    assert cosine(np.array([1.0, 0]), np.array([2.0, 0])) == pytest.approx(1)
    assert cosine(np.array([1.0, 0]), np.array([0, 3.0])) == pytest.approx(0)
