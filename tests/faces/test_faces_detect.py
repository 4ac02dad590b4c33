"""Detection (YuNet via OpenCV) and alignment on real photos: count, geometry, negatives."""

from __future__ import annotations

import numpy as np
import pytest

from mifa_pipeline.faces.detect import Face, align


def test_astronaut_has_exactly_one_face(detector, astronaut):
    faces = detector.detect(astronaut)
    assert len(faces) == 1
    face = faces[0]
    x1, y1, x2, y2 = face.bbox
    assert 150 < x1 < x2 < 300 and 30 < y1 < y2 < 220 and face.score > 0.8
    kps = face.kps
    assert kps.shape == (5, 2)
    assert np.all((kps >= face.bbox[:2] - 5) & (kps <= face.bbox[2:] + 5)), "keypoints inside the box"
    # ArcFace order: image-left eye, image-right eye, nose, image-left and image-right mouth corner.
    assert kps[0, 0] < kps[1, 0] and kps[3, 0] < kps[4, 0]
    assert max(kps[0, 1], kps[1, 1]) < kps[2, 1] < min(kps[3, 1], kps[4, 1])


def test_mirror_and_crop_still_one_face(detector, astronaut):
    assert len(detector.detect(np.ascontiguousarray(astronaut[:, ::-1]))) == 1
    assert len(detector.detect(np.ascontiguousarray(astronaut[20:300, 120:400]))) == 1


def test_group_photo_has_several_faces(detector, t1):
    faces = detector.detect(t1)
    assert len(faces) == 6
    assert [f.score for f in faces] == sorted((f.score for f in faces), reverse=True)
    centres = np.array([[(f.bbox[0] + f.bbox[2]) / 2, (f.bbox[1] + f.bbox[3]) / 2] for f in faces])
    assert len({tuple(np.round(c, -1)) for c in centres}) == 6, "six distinct places"


@pytest.mark.parametrize("kind", ["blank", "grey", "noise"])
def test_no_face_in_blank_or_noise(detector, kind):
    rng = np.random.default_rng(0)
    image = {"blank": np.zeros((480, 640, 3), np.uint8), "grey": np.full((512, 512, 3), 128, np.uint8),
             "noise": rng.integers(0, 256, (512, 512, 3), dtype=np.uint8)}[kind]
    assert detector.detect(image) == []


def test_boxes_match_the_filter_stage_callable(detector, astronaut):
    (x, y, w, h, score), = detector.boxes(astronaut)
    face = detector.detect(astronaut)[0]
    assert (x, y, x + w, y + h) == pytest.approx(tuple(face.bbox.tolist()))
    assert score == pytest.approx(face.score)


def test_rejects_non_rgb_input(detector, astronaut):
    with pytest.raises(ValueError, match="RGB uint8"):
        detector.detect(astronaut[:, :, 0])
    with pytest.raises(ValueError, match="RGB uint8"):
        detector.detect(astronaut.astype(np.float32))


def test_alignment_puts_eyes_on_the_arcface_template(detector, astronaut):
    face = detector.detect(astronaut)[0]
    aligned = align(astronaut, face)
    assert aligned.shape == (112, 112, 3) and aligned.dtype == np.uint8
    # Re-detecting on the aligned crop finds the eyes near the template's (38.3, 51.7) and (73.5, 51.5).
    padded = np.zeros((224, 224, 3), np.uint8)
    padded[56:168, 56:168] = aligned
    again = detector.detect(padded)
    assert len(again) == 1
    eyes = again[0].kps[:2] - 56
    np.testing.assert_allclose(eyes, [[38.29, 51.70], [73.53, 51.50]], atol=6)


def test_missing_model_file_says_how_to_get_it(tmp_path):
    from mifa_pipeline.faces.detect import YuNetDetector

    with pytest.raises(FileNotFoundError, match="install-face-models"):
        YuNetDetector(tmp_path / "absent.onnx")


def test_face_geometry_helpers():
    face = Face(bbox=np.array([10, 20, 40, 80], np.float32), kps=np.zeros((5, 2), np.float32), score=0.9)
    assert face.xywh == (10, 20, 30, 60) and face.area == 1800
