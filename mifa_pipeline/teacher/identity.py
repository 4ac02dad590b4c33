"""Identity parameters of a procedural face and their sampling.

An identity is everything about a face that stays fixed while its expression (the AUs) changes. The
ranges are wide on purpose: a face-identity model must be able to tell the sampled identities apart,
and the teacher data set should span the full range of skin tones, face shapes and hair.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

RGB = tuple[int, int, int]

HAIR_STYLES: tuple[str, ...] = ("short", "long", "bob", "curly", "buzz", "bun")
FACIAL_HAIR: tuple[str, ...] = ("none", "stubble", "moustache", "goatee", "beard")
_FACIAL_HAIR_WEIGHTS = np.array([0.7, 0.09, 0.07, 0.05, 0.09])

# Skin tones from very light to very dark (sRGB), roughly along the Fitzpatrick / Monk scale.
_SKIN_ANCHORS = np.array([
    (250, 222, 200), (238, 198, 170), (224, 175, 140), (200, 146, 108), (172, 116, 82),
    (140, 90, 62), (110, 70, 48), (88, 56, 40), (70, 45, 33),
], dtype=np.float64)

_EYE_COLOURS: tuple[RGB, ...] = (
    (58, 36, 22), (84, 52, 30), (110, 74, 40), (118, 102, 52), (78, 110, 70), (70, 110, 150),
    (100, 130, 160), (45, 30, 22),
)
_HAIR_COLOURS: tuple[RGB, ...] = (
    (20, 16, 14), (36, 26, 20), (60, 40, 28), (92, 62, 40), (128, 86, 52), (150, 70, 36),
    (196, 160, 104), (222, 196, 140), (150, 146, 140), (210, 208, 204),
)
# Darker hair colours are commoner; the weights follow the order of _HAIR_COLOURS.
_HAIR_WEIGHTS = np.array([0.22, 0.2, 0.16, 0.11, 0.07, 0.05, 0.06, 0.04, 0.05, 0.04])


@dataclass(frozen=True)
class IdentityParams:
    """The fixed look of one face. Lengths are relative (1.0 = average); colours are sRGB 0..255."""

    face_width: float        # face width / height ratio multiplier (narrow .. broad)
    face_height: float       # overall head size
    jaw_width: float         # width of the jaw relative to the cheekbones (pointed .. square)
    skin: RGB
    eye_size: float
    eye_spacing: float
    eye_tilt: float          # outer corner up (+) or down (-), in face heights
    eye_colour: RGB
    eye_openness: float      # lid aperture relative to average (hooded .. round eyes)
    brow_thickness: float
    brow_arch: float         # 0 = straight, 1 = strongly arched
    brow_height: float       # distance brow-eye relative to average
    brow_tilt: float         # outer end up (+) or down (-), in face heights
    brow_colour: RGB
    midface: float           # eye-to-mouth distance relative to average
    nose_length: float
    nose_width: float
    mouth_width: float
    lip_fullness: float
    lip_colour: RGB
    hair_colour: RGB
    hair_style: str
    facial_hair: str
    mole: tuple[float, float] | None   # a beauty mark in face units (x / half-width, y / half-height), or none
    clothing_colour: RGB
    background_colour: RGB
    seed: int                # drives the small texture details (hair strands) deterministically

    def to_dict(self) -> dict:
        return asdict(self)


def _clip_rgb(c) -> RGB:
    return tuple(int(v) for v in np.clip(np.rint(c), 0, 255))  # type: ignore[return-value]


def _skin_tone(rng: np.random.Generator) -> RGB:
    """Uniform over the tone scale (so dark and light skin are equally common), with undertone jitter."""
    t = rng.uniform(0.0, 1.0) * (len(_SKIN_ANCHORS) - 1)
    i = min(int(t), len(_SKIN_ANCHORS) - 2)
    c = _SKIN_ANCHORS[i] * (1 - (t - i)) + _SKIN_ANCHORS[i + 1] * (t - i)
    warm = float(np.clip(rng.normal(0.0, 0.035), -0.08, 0.08))  # olive/yellow (-) .. pink/red (+) undertone
    c = c * np.array([1 + warm, 1 - 0.3 * warm, 1 - 0.6 * warm]) * rng.uniform(0.98, 1.02, 3)
    return _clip_rgb(c)


def _hsv_colour(rng: np.random.Generator, s: tuple[float, float], v: tuple[float, float]) -> RGB:
    import colorsys
    r, g, b = colorsys.hsv_to_rgb(rng.uniform(0, 1), rng.uniform(*s), rng.uniform(*v))
    return _clip_rgb(np.array([r, g, b]) * 255)


def _lip_colour(rng: np.random.Generator, skin: RGB) -> RGB:
    """Lips are the skin tone made redder and a little darker; multiplicative, so it works on every tone."""
    s = np.array(skin, dtype=np.float64)
    ratio = np.array([0.9, 0.72, 0.74]) * rng.uniform(0.92, 1.04, 3) * rng.uniform(0.85, 1.0)
    return _clip_rgb(s * ratio + np.array([6.0, 0.0, 2.0]))


def _mole(rng: np.random.Generator) -> tuple[float, float] | None:
    """A third of faces get a beauty mark on a cheek or the chin (away from the features)."""
    if rng.random() > 0.33:
        return None
    return (float(rng.choice([-1, 1]) * rng.uniform(0.3, 0.6)), float(rng.uniform(0.2, 0.7)))


def sample_identity(rng: np.random.Generator) -> IdentityParams:
    """One random identity; every draw comes from ``rng`` so a seed reproduces it exactly."""
    skin = _skin_tone(rng)
    hair_colour = _HAIR_COLOURS[rng.choice(len(_HAIR_COLOURS), p=_HAIR_WEIGHTS / _HAIR_WEIGHTS.sum())]
    hair_colour = _clip_rgb(np.array(hair_colour) + rng.normal(0, 6, 3))
    brow = np.array(hair_colour, dtype=np.float64)
    if brow.mean() > 150:                          # grey/blond hair: brows stay a little darker
        brow = brow * 0.7
    brow_colour = _clip_rgb(brow * rng.uniform(0.8, 1.0))
    return IdentityParams(
        face_width=float(rng.uniform(0.82, 1.18)),
        face_height=float(rng.uniform(0.93, 1.07)),
        jaw_width=float(rng.uniform(0.0, 1.0)),
        skin=skin,
        eye_size=float(rng.uniform(0.8, 1.2)),
        eye_spacing=float(rng.uniform(0.85, 1.15)),
        eye_tilt=float(rng.uniform(-0.025, 0.045)),
        eye_colour=_clip_rgb(np.array(_EYE_COLOURS[rng.integers(len(_EYE_COLOURS))]) + rng.normal(0, 8, 3)),
        eye_openness=float(rng.uniform(0.8, 1.2)),
        brow_thickness=float(rng.uniform(0.7, 1.4)),
        brow_arch=float(rng.uniform(0.0, 1.0)),
        brow_height=float(rng.uniform(0.85, 1.2)),
        brow_tilt=float(rng.uniform(-0.02, 0.03)),
        brow_colour=brow_colour,
        midface=float(rng.uniform(0.9, 1.1)),
        nose_length=float(rng.uniform(0.82, 1.18)),
        nose_width=float(rng.uniform(0.75, 1.4)),
        mouth_width=float(rng.uniform(0.8, 1.2)),
        lip_fullness=float(rng.uniform(0.7, 1.35)),
        lip_colour=_lip_colour(rng, skin),
        hair_colour=hair_colour,
        hair_style=HAIR_STYLES[int(rng.integers(len(HAIR_STYLES)))],
        facial_hair=FACIAL_HAIR[int(rng.choice(len(FACIAL_HAIR), p=_FACIAL_HAIR_WEIGHTS))],
        mole=_mole(rng),
        clothing_colour=_hsv_colour(rng, (0.1, 0.8), (0.15, 0.9)),
        background_colour=_hsv_colour(rng, (0.05, 0.45), (0.45, 0.95)),
        seed=int(rng.integers(0, 2**31 - 1)),
    )
