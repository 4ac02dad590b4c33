"""AU proxies from MediaPipe blendshapes: they move with real expressions, and say what they cover."""

from __future__ import annotations

import numpy as np
import pytest

from mifa_pipeline.faces.au_estimate import (AU_ESTIMATORS, BLENDSHAPE_AU_TABLE, DISFA12, AUEstimator,
                                             build_au_estimator, crop_around)

# t1.jpg, faces left to right: Aniston (faint smirk, looking down), Cox (neutral, lips closed),
# Schwimmer (smile), Perry (laugh), LeBlanc (neutral, lips apart), Kudrow (smile). Checked by eye.
SMILING, NEUTRAL = (2, 3, 5), (0, 1, 4)


@pytest.fixture(scope="module")
def t1_aus(au_estimator, t1, t1_faces):
    return [au_estimator.estimate(t1, face) for face in t1_faces]


def test_covers_disfa12_with_scores_in_unit_range(au_estimator, astronaut):
    aus = au_estimator.estimate(astronaut)
    assert list(aus) == list(DISFA12)
    for au, value in aus.items():
        assert value is not None and 0.0 <= value <= 1.0, au


def test_smile_proxy_rises_for_smiling_faces(au_estimator, astronaut, t1_aus):
    smiling = [au_estimator.estimate(astronaut)["AU12"]] + [t1_aus[i]["AU12"] for i in SMILING]
    neutral = [t1_aus[i]["AU12"] for i in NEUTRAL]
    assert min(smiling) > 0.6, smiling
    assert max(neutral) < 0.2, neutral
    assert min(smiling) > max(neutral) + 0.5


def test_lips_part_proxy_follows_the_mouth(au_estimator, astronaut, t1_aus):
    # The astronaut's smile shows teeth; LeBlanc's lips are apart; Cox's are closed.
    assert au_estimator.estimate(astronaut)["AU25"] > 0.6
    assert t1_aus[4]["AU25"] > 0.6
    assert t1_aus[1]["AU25"] < 0.15


def test_cheek_raise_proxy_reads_smiles_from_the_lower_lid(au_estimator, astronaut, t1_aus):
    # cheekSquint stayed < 1e-5 on all these faces; the lower-lid measure separates them on average (not
    # face by face: Aniston looks down, which also lifts the lower lid in the picture)
    smiling = [au_estimator.estimate(astronaut)["AU6"]] + [t1_aus[i]["AU6"] for i in SMILING]
    neutral = [t1_aus[i]["AU6"] for i in NEUTRAL]
    assert np.mean(smiling) > np.mean(neutral) + 0.25, (smiling, neutral)
    assert t1_aus[3]["AU6"] > 0.6  # Perry's laugh
    assert t1_aus[1]["AU6"] < 0.3  # Cox, neutral


def test_cheek_raise_proxy_ignores_head_roll(au_estimator, detector, astronaut, t1, t1_faces):
    # mid-scale faces (not clipped at 0 or 1); measured on image rows instead of the eye's own axis, the
    # astronaut's score moved by 0.16 at 45 degrees of roll and Aniston's by 0.41
    import cv2

    from mifa_pipeline.faces.au_estimate import crop_around

    for face in (crop_around(astronaut, detector.detect(astronaut)[0]), crop_around(t1, t1_faces[0])):
        h, w = face.shape[:2]
        rolled = cv2.warpAffine(face, cv2.getRotationMatrix2D((w / 2, h / 2), 45, 1.0), (w, h))
        upright = au_estimator.estimate(face)["AU6"]
        assert 0.1 < upright < 0.9
        assert abs(upright - au_estimator.estimate(rolled)["AU6"]) < 0.1


def test_cheek_raise_proxy_follows_a_rendered_cheek_raise(au_estimator):
    from mifa_pipeline.teacher import render_face, sample_identity

    rng = np.random.default_rng(5)
    for _ in range(3):
        person = sample_identity(rng)
        sweep = [au_estimator.estimate(render_face(person, {"AU6": float(level)}, size=256).image)["AU6"]
                 for level in range(6)]
        assert all(b >= a - 0.02 for a, b in zip(sweep, sweep[1:])), sweep
        assert sweep[-1] > sweep[0] + 0.4, sweep


def test_mirror_gives_the_same_estimate(au_estimator, astronaut):
    a = au_estimator.estimate(astronaut)
    b = au_estimator.estimate(np.ascontiguousarray(astronaut[:, ::-1]))
    for au in DISFA12:
        assert abs(a[au] - b[au]) < 0.15, (au, a[au], b[au])


def test_face_crop_agrees_with_the_whole_portrait(au_estimator, detector, astronaut):
    whole = au_estimator.estimate(astronaut)
    cropped = au_estimator.estimate(astronaut, detector.detect(astronaut)[0])
    assert abs(whole["AU12"] - cropped["AU12"]) < 0.1


def test_no_face_gives_all_none(au_estimator):
    aus = au_estimator.estimate(np.full((256, 256, 3), 90, np.uint8))
    assert aus == {au: None for au in DISFA12}


def test_uncovered_aus_are_none_and_described(model_dir, astronaut):
    pytest.importorskip("mediapipe")
    from mifa_pipeline.faces.au_estimate import MediaPipeBlendshapeAU

    estimator = MediaPipeBlendshapeAU(model_dir / "face_landmarker.task", aus=("AU12", "AU23", "AU25", "AU43"))
    try:
        aus = estimator.estimate(astronaut)
        assert aus["AU23"] is None and aus["AU43"] is None and aus["AU12"] > 0.6
        info = estimator.describe()
        assert info["not_covered"] == ["AU23", "AU43"] and info["covered"] == ["AU12", "AU25"]
        assert info["aus"]["AU12"] == "mean(mouthSmileLeft, mouthSmileRight)"
        assert "landmarks" in info["aus"]["AU25"]
    finally:
        estimator.close()


def test_describe_default_covers_all_of_disfa12(au_estimator):
    info = au_estimator.describe()
    assert info["covered"] == list(DISFA12) and info["not_covered"] == []
    assert "proxy" in info["scale"]


def test_table_uses_only_real_mediapipe_blendshapes(au_estimator, astronaut):
    scores, landmarks = au_estimator.blendshapes(astronaut)
    assert len(scores) == 52 and landmarks.shape == (478, 2)
    for names in BLENDSHAPE_AU_TABLE.values():
        assert set(names) <= set(scores)


class _ConstantAU(AUEstimator):
    name = "constant"

    def __init__(self, value: float = 0.5):
        self.value = value

    def estimate(self, image, face=None):
        return {au: self.value for au in self.aus}

    def describe(self):
        return {"name": self.name, "aus": {au: "constant" for au in self.aus}}


def test_estimators_plug_in_by_name(monkeypatch):
    monkeypatch.setitem(AU_ESTIMATORS, "constant", _ConstantAU)
    assert build_au_estimator("constant", value=0.25).estimate(None)["AU1"] == 0.25
    by_path = build_au_estimator(f"{__name__}:_ConstantAU", value=0.75)
    assert isinstance(by_path, _ConstantAU) and by_path.value == 0.75
    with pytest.raises(KeyError, match="unknown AU estimator"):
        build_au_estimator("nope")


def test_crop_around_pads_at_the_border(detector, astronaut):
    face = detector.detect(astronaut)[0]
    crop = crop_around(astronaut, face, scale=6.0, min_side=64)
    assert crop.shape[0] == crop.shape[1] and crop.shape[0] > astronaut.shape[0]


def test_native_start_up_chatter_is_held_back_unless_creation_fails(capfd):
    """MediaPipe's C++ start-up lines would clutter every filter worker's log; an error must keep them."""
    import os

    from mifa_pipeline.faces.au_estimate import _native_stderr_kept_unless_failing

    with _native_stderr_kept_unless_failing():
        os.write(2, b"W0000 chatter from native code\n")
    assert "chatter" not in capfd.readouterr().err

    with pytest.raises(RuntimeError), _native_stderr_kept_unless_failing():
        os.write(2, b"E0000 why the graph failed\n")
        raise RuntimeError("landmarker could not start")
    assert "why the graph failed" in capfd.readouterr().err
