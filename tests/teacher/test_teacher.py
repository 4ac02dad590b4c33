"""The procedural teacher: deterministic, identity-diverse, and every AU moves exactly the geometry it names."""

from __future__ import annotations

from types import MappingProxyType

import numpy as np
import pytest

from mifa_pipeline.teacher import AU_NAMES, FACIAL_HAIR, HAIR_STYLES, IdentityParams, render_face, sample_identity

LEVELS = [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
SEEDS = [0, 1, 2, 3]


def ident(seed: int) -> IdentityParams:
    return sample_identity(np.random.default_rng(seed))


def lms(seed: int, au: str, level: float, size: int = 128) -> dict[str, np.ndarray]:
    return render_face(ident(seed), {au: level}, size).landmarks


# ---------------------------------------------------------------------------------------------------- basics


def test_output_types_and_shapes():
    for size in (128, 256):
        r = render_face(ident(0), {"AU12": 3}, size)
        assert r.image.dtype == np.uint8 and r.image.shape == (size, size, 3)
        assert r.face_mask.dtype == np.uint8 and r.face_mask.shape == (size, size)
        assert set(np.unique(r.face_mask)) <= {0, 255}
        for name, p in r.landmarks.items():
            assert p.shape == (2,) and 0 <= p[0] < size and 0 <= p[1] < size, name


def test_deterministic_bytes():
    a = render_face(ident(5), {"AU6": 2.5, "AU12": 4, "AU25": 1}, 160)
    b = render_face(ident(5), {"AU6": 2.5, "AU12": 4, "AU25": 1}, 160)
    assert a.image.tobytes() == b.image.tobytes()
    assert a.face_mask.tobytes() == b.face_mask.tobytes()
    assert all(np.array_equal(a.landmarks[k], b.landmarks[k]) for k in a.landmarks)
    assert ident(5) == ident(5)


def test_different_identities_give_different_images():
    imgs = [render_face(ident(s), {}, 128).image.astype(np.float32) for s in range(6)]
    for i in range(len(imgs)):
        for j in range(i + 1, len(imgs)):
            assert np.abs(imgs[i] - imgs[j]).mean() > 5.0, (i, j)


def test_missing_aus_are_zero_and_mappings_are_accepted():
    idp = ident(3)
    zero = render_face(idp, {a: 0 for a in AU_NAMES}).image
    assert np.array_equal(render_face(idp, {}).image, zero)
    assert np.array_equal(render_face(idp, None).image, zero)
    assert np.array_equal(render_face(idp, MappingProxyType({"AU12": 3})).image, render_face(idp, {"AU12": 3}).image)
    with pytest.raises(ValueError):
        render_face(idp, {"AU7": 2})


def test_mask_covers_face_centre_not_background_corners():
    for seed in range(8):
        r = render_face(ident(seed), {"AU26": 5, "AU12": 3}, 128)
        lm, m = r.landmarks, r.face_mask
        for name in ("nose_tip", "pupil_left", "pupil_right", "upper_lip_top", "chin", "brow_peak_left"):
            x, y = np.round(lm[name]).astype(int)
            assert m[y, x] == 255, (seed, name)
        c = 6
        assert m[:c, :c].max() == 0 and m[:c, -c:].max() == 0 and m[-c:, :c].max() == 0 and m[-c:, -c:].max() == 0
        assert 0.15 < (m > 0).mean() < 0.6


def test_every_hair_and_beard_style_renders_a_valid_face():
    """Hair and beards never cover the eyes or mouth landmarks' neighbourhood with hair colour."""
    from dataclasses import replace

    base = ident(4)
    for style in HAIR_STYLES:
        for beard in FACIAL_HAIR:
            r = render_face(replace(base, hair_style=style, facial_hair=beard), {"AU26": 3, "AU12": 2}, 128)
            assert r.face_mask[0, 0] == 0 and r.face_mask[64, 64] == 255
            for name in ("pupil_left", "pupil_right"):
                x, y = np.round(r.landmarks[name]).astype(int)
                assert r.image[y, x].max() < 120, (style, beard, name)   # a dark pupil, not hair or skin


def test_face_is_centred_and_fills_about_half_the_height():
    for seed in range(8):
        r = render_face(ident(seed), {}, 128)
        lm = r.landmarks
        mid_x = 0.5 * (lm["pupil_left"][0] + lm["pupil_right"][0])
        assert abs(mid_x - 64) < 2
        brow_to_chin = lm["chin"][1] - min(lm["brow_peak_left"][1], lm["brow_peak_right"][1])
        assert 0.3 * 128 < brow_to_chin < 0.55 * 128


def test_identity_sampling_is_diverse():
    rng = np.random.default_rng(11)
    ids = [sample_identity(rng) for _ in range(300)]
    lum = np.array([np.dot(i.skin, (0.299, 0.587, 0.114)) for i in ids])
    assert lum.min() < 60 and lum.max() > 200           # very dark and very light skin both occur
    assert np.mean(lum < 120) > 0.25 and np.mean(lum > 160) > 0.25
    assert {i.hair_style for i in ids} == set(HAIR_STYLES)
    assert {i.facial_hair for i in ids} == set(FACIAL_HAIR)
    assert np.ptp([i.face_width for i in ids]) > 0.2 and np.ptp([i.nose_length for i in ids]) > 0.2


# ---------------------------------------------------------------------------------------------------- AU controls
# Each entry: AU -> (list of (description, function of landmarks, expected sign of change per level),
#                    landmark names that must not move).

def _y(n):
    return lambda L: float(L[n][1])


def _pair(n, f):
    return [(f"{n}_{s}", (lambda s: lambda L: f(L, f"{n}_{s}"))(s)) for s in ("left", "right")]


UP, DOWN, MORE, LESS = -1, +1, +1, -1     # y grows downward: "up" is a decreasing y

BROWS = [f"brow_{p}_{s}" for p in ("inner", "peak", "outer") for s in ("left", "right")]
EYES = [f"{p}_{s}" for p in ("upper_lid", "lower_lid", "eye_inner", "eye_outer", "pupil") for s in ("left", "right")]
MOUTH = ["mouth_corner_left", "mouth_corner_right", "upper_lip_top", "upper_lip_bottom", "lower_lip_top",
         "lower_lip_bottom"]
NOSE = ["nose_tip", "nose_root", "nostril_left", "nostril_right"]


def width(a, b):
    return lambda L: float(L[a][0] - L[b][0])


def aperture(s):
    return lambda L: float(L[f"lower_lid_{s}"][1] - L[f"upper_lid_{s}"][1])


AU_CASES = {
    "AU1": ([("inner brows up", _y("brow_inner_left"), UP), ("inner brows up (r)", _y("brow_inner_right"), UP)],
            EYES + MOUTH + NOSE + ["chin", "brow_outer_left", "brow_outer_right"]),
    "AU2": ([("outer brows up", _y("brow_outer_left"), UP), ("outer brows up (r)", _y("brow_outer_right"), UP)],
            EYES + MOUTH + NOSE + ["chin", "brow_inner_left", "brow_inner_right"]),
    "AU4": ([("inner brows down", _y("brow_inner_left"), DOWN), ("inner brows down (r)", _y("brow_inner_right"), DOWN),
             ("inner brows together", width("brow_inner_left", "brow_inner_right"), LESS)],
            EYES + MOUTH + NOSE + ["chin"]),
    "AU5": ([("upper lid up", _y("upper_lid_left"), UP), ("aperture wider", aperture("left"), MORE),
             ("aperture wider (r)", aperture("right"), MORE)],
            BROWS + MOUTH + NOSE + ["chin", "lower_lid_left", "lower_lid_right", "pupil_left"]),
    "AU6": ([("lower lid up", _y("lower_lid_left"), UP), ("lower lid up (r)", _y("lower_lid_right"), UP),
             ("aperture narrower", aperture("left"), LESS), ("cheek up", _y("cheek_left"), UP)],
            BROWS + MOUTH + NOSE + ["chin", "upper_lid_left", "upper_lid_right"]),
    "AU9": ([("alae up", _y("nostril_left"), UP), ("alae up (r)", _y("nostril_right"), UP),
             ("upper lip up", _y("upper_lip_top"), UP)],
            BROWS + EYES + ["mouth_corner_left", "mouth_corner_right", "lower_lip_bottom", "chin"]),
    "AU12": ([("corners up", _y("mouth_corner_left"), UP), ("corners up (r)", _y("mouth_corner_right"), UP),
              ("mouth wider", width("mouth_corner_left", "mouth_corner_right"), MORE)],
             BROWS + EYES + NOSE + ["chin", "upper_lip_top"]),
    "AU15": ([("corners down", _y("mouth_corner_left"), DOWN), ("corners down (r)", _y("mouth_corner_right"), DOWN)],
             BROWS + EYES + NOSE + ["chin", "upper_lip_top"]),
    "AU17": ([("chin up", _y("chin"), UP), ("lower lip up", _y("lower_lip_bottom"), UP)],
             BROWS + EYES + NOSE + ["mouth_corner_left", "mouth_corner_right"]),
    "AU20": ([("mouth wider", width("mouth_corner_left", "mouth_corner_right"), MORE),
              ("upper lip thinner", lambda L: float(L["upper_lip_bottom"][1] - L["upper_lip_top"][1]), LESS),
              ("lower lip thinner", lambda L: float(L["lower_lip_bottom"][1] - L["lower_lip_top"][1]), LESS)],
             BROWS + EYES + NOSE + ["chin"]),
    "AU25": ([("lips apart", lambda L: float(L["lower_lip_top"][1] - L["upper_lip_bottom"][1]), MORE)],
             BROWS + EYES + NOSE + ["chin"]),
    "AU26": ([("chin down", _y("chin"), DOWN), ("mouth open",
              lambda L: float(L["lower_lip_top"][1] - L["upper_lip_bottom"][1]), MORE),
              ("lower lip down", _y("lower_lip_bottom"), DOWN)],
             BROWS + EYES + NOSE),
}


def test_every_au_has_a_case():
    assert set(AU_CASES) == set(AU_NAMES)


@pytest.mark.parametrize("au", AU_NAMES)
@pytest.mark.parametrize("seed", SEEDS)
def test_au_moves_named_landmarks_monotonically(au, seed):
    checks, _ = AU_CASES[au]
    series = [lms(seed, au, v) for v in LEVELS]
    fh = 0.33 * 128 * ident(seed).face_height
    for desc, f, sign in checks:
        vals = np.array([f(L) for L in series]) * sign
        steps = np.diff(vals)
        assert np.all(steps > 1e-6), f"{au} {desc}: not monotonic {vals * sign}"
        assert vals[-1] - vals[0] > 0.015 * fh, f"{au} {desc}: moves too little ({vals[-1] - vals[0]:.2f}px)"


@pytest.mark.parametrize("au", AU_NAMES)
@pytest.mark.parametrize("seed", SEEDS[:2])
def test_au_leaves_unrelated_landmarks_alone(au, seed):
    _, fixed = AU_CASES[au]
    a, b = lms(seed, au, 0.0), lms(seed, au, 5.0)
    for name in fixed:
        assert np.allclose(a[name], b[name], atol=1e-9), f"{au} moved {name}: {a[name]} -> {b[name]}"


@pytest.mark.parametrize("au", AU_NAMES)
def test_au_changes_pixels_monotonically_in_its_region(au):
    """The image moves away from neutral as intensity grows, and the change sits in the right face half."""
    idp = ident(2)
    r0 = render_face(idp, {}, 128)
    diffs, last = [], None
    for v in LEVELS[1:]:
        img = render_face(idp, {au: v}, 128).image
        d = np.abs(img.astype(np.int16) - r0.image.astype(np.int16)).sum(-1)
        diffs.append(float(d.sum()))
        last = d
    assert np.all(np.diff(diffs) > 0), f"{au}: {diffs}"
    ys, _ = np.nonzero(last > 30)
    assert len(ys) > 20
    eye_y = r0.landmarks["pupil_left"][1]
    upper = {"AU1", "AU2", "AU4", "AU5", "AU6"}
    if au in upper:
        assert np.median(ys) < eye_y + 0.1 * 128, au
    else:
        assert np.median(ys) > eye_y, au


def test_open_mouth_shows_teeth():
    for seed in SEEDS:
        idp = ident(seed)
        for au in ({"AU26": 5}, {"AU25": 5}):
            r = render_face(idp, au, 256)
            lm = r.landmarks
            x0, x1 = int(lm["mouth_corner_right"][0]), int(lm["mouth_corner_left"][0])
            y0, y1 = int(lm["upper_lip_bottom"][1]), int(lm["lower_lip_top"][1]) + 1
            patch = r.image[y0:y1, x0:x1].astype(int)
            teeth = (patch.min(-1) > 180).sum()
            assert teeth > 15, (seed, au, teeth)
        closed = render_face(idp, {}, 256)
        lm = closed.landmarks
        assert lm["lower_lip_top"][1] - lm["upper_lip_bottom"][1] < 1e-6
