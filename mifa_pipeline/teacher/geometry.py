"""Face geometry from an identity and DISFA-12 AU intensities: the only place the AU controls live.

Everything is in output-pixel coordinates (x right, y down). "left"/"right" in landmark names are the
face's own sides (anatomical convention, as in FACS and YuNet): ``*_left`` lies on the image's right.

The neutral face is built first (`_neutral`), then one small function per AU group moves the named
points by an amount proportional to intensity/5 (so every control is monotonic and vanishes at 0).
The drawing code (`render.py`) only reads the resulting `Geometry`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from .identity import IdentityParams

AU_NAMES: tuple[str, ...] = ("AU1", "AU2", "AU4", "AU5", "AU6", "AU9", "AU12", "AU15", "AU17", "AU20", "AU25", "AU26")
SIDES = {"left": 1.0, "right": -1.0}   # sign of the x offset from the midline for the face's own side


def _intensities(au: Mapping[str, float] | None) -> dict[str, float]:
    """AU name -> activation in 0..1 (intensity/5, clipped); unknown names are an error, missing are 0."""
    au = dict(au or {})
    unknown = set(au) - set(AU_NAMES)
    if unknown:
        raise ValueError(f"unknown AUs {sorted(unknown)}; the teacher renders {AU_NAMES}")
    return {name: float(np.clip(float(au.get(name, 0.0)), 0.0, 5.0)) / 5.0 for name in AU_NAMES}


def _bezier(p0, pm, p2, n: int) -> np.ndarray:
    """Quadratic Bezier from p0 to p2 passing through pm at t=0.5, sampled at n points."""
    p0, pm, p2 = (np.asarray(p, dtype=np.float64) for p in (p0, pm, p2))
    c = 2.0 * pm - 0.5 * (p0 + p2)
    t = np.linspace(0.0, 1.0, n)[:, None]
    return (1 - t) ** 2 * p0 + 2 * (1 - t) * t * c + t**2 * p2


@dataclass
class Eye:
    inner: np.ndarray
    outer: np.ndarray
    upper: np.ndarray          # (n, 2) upper lid margin, inner -> outer
    lower: np.ndarray          # (n, 2) lower lid margin, inner -> outer
    iris_centre: np.ndarray
    iris_r: float
    width: float
    crease: np.ndarray         # (n, 2) upper-lid crease (fixed skin fold above the lid)


@dataclass
class Brow:
    centre: np.ndarray         # (n, 2) centre line, inner -> outer
    thickness: np.ndarray      # (n,)


@dataclass
class Mouth:
    upper_outer: np.ndarray    # (n, 2) all four curves run right corner -> left corner at the same t
    upper_inner: np.ndarray
    lower_inner: np.ndarray
    lower_outer: np.ndarray
    gap: float                 # opening between the lips at the midline (pixels)


@dataclass
class Geometry:
    """Everything the renderer draws, plus the named landmarks the tests check."""

    size: int
    cx: float
    cy: float
    fw: float                  # half-width of the face at the cheekbones
    fh: float                  # half-height of the head ellipse (crown to chin)
    outline: np.ndarray        # (n, 2) closed face outline, jaw included
    eyes: dict[str, Eye]
    brows: dict[str, Brow]
    mouth: Mouth
    nose_w: float
    detail: dict[str, float]   # wrinkle / bulge strengths 0..1 that the renderer shades
    landmarks: dict[str, np.ndarray] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------------
# Neutral face: a parameter set of points that the AU functions below move.


@dataclass
class _Points:
    """The movable control points of a face, before curves are built from them."""

    chin_drop: float = 0.0     # downward displacement of the chin/jaw outline (negative = raised, AU17)
    brow: dict = field(default_factory=dict)      # side -> {"inner","peak","outer": point, "th": float}
    eye: dict = field(default_factory=dict)       # side -> {"inner","outer": point, "hu","hl": float}
    cheek: dict = field(default_factory=dict)     # side -> point
    nostril: dict = field(default_factory=dict)   # side -> point
    nose_tip: np.ndarray = None
    nose_root: np.ndarray = None
    corner: dict = field(default_factory=dict)    # side -> mouth corner point
    stomion: np.ndarray = None                    # midline of the lip line (closed mouth)
    upper_open: float = 0.0                       # upper inner lip moves up by this when the lips part
    lower_open: float = 0.0                       # lower inner lip moves down by this
    lower_push: float = 0.0                       # lower lip (inner and outer) pushed up (AU17)
    upper_th: float = 0.0                         # upper lip thickness at the midline
    lower_th: float = 0.0


def _neutral(idp: IdentityParams, size: int) -> tuple[_Points, dict]:
    s = float(size)
    fh = 0.33 * s * idp.face_height
    fw = fh * 0.74 * idp.face_width
    cx, cy = 0.5 * s, 0.45 * s
    frame = {"cx": cx, "cy": cy, "fw": fw, "fh": fh}
    p = _Points()
    eye_y = cy + 0.01 * fh
    ex = 0.36 * fw * idp.eye_spacing
    ew = min(0.2 * fw * idp.eye_size, 0.8 * ex)          # half-width; eyes never touch
    for side, sg in SIDES.items():
        inner = np.array([cx + sg * (ex - ew), eye_y + 0.2 * idp.eye_tilt * fh])
        outer = np.array([cx + sg * (ex + ew), eye_y - 0.8 * idp.eye_tilt * fh])
        op = idp.eye_openness
        p.eye[side] = {"inner": inner, "outer": outer, "hu": 0.44 * ew * op, "hl": 0.30 * ew * op, "ew": ew}
        by = eye_y - 0.16 * fh * idp.brow_height
        th = 0.05 * fh * idp.brow_thickness
        p.brow[side] = {
            "inner": np.array([cx + sg * (ex - 1.05 * ew), by + 0.01 * fh]),
            "peak": np.array([cx + sg * (ex + 0.3 * ew), by - (0.012 + 0.05 * idp.brow_arch) * fh]),
            "outer": np.array([cx + sg * (ex + 1.35 * ew), by + (0.025 + 0.02 * idp.brow_arch - idp.brow_tilt) * fh]),
            "th": th,
        }
        p.cheek[side] = np.array([cx + sg * 0.52 * fw, eye_y + 0.3 * fh])
    lip_y = eye_y + 0.61 * fh * idp.midface
    tip_y = min(eye_y + 0.34 * fh * idp.nose_length * idp.midface, lip_y - 0.21 * fh)  # room for the upper lip
    nw = 0.2 * fw * idp.nose_width
    p.nose_tip = np.array([cx, tip_y])
    p.nose_root = np.array([cx, eye_y - 0.04 * fh])
    for side, sg in SIDES.items():
        p.nostril[side] = np.array([cx + sg * 0.55 * nw, tip_y + 0.025 * fh])
    mw = 0.36 * fw * idp.mouth_width
    for side, sg in SIDES.items():
        p.corner[side] = np.array([cx + sg * mw, lip_y + 0.005 * fh])
    p.stomion = np.array([cx, lip_y])
    p.upper_th = 0.06 * fh * idp.lip_fullness
    p.lower_th = 0.08 * fh * idp.lip_fullness
    frame["nw"] = nw
    return p, frame


# ----------------------------------------------------------------------------------------------------
# AU controls: one small function per AU group. `a` is intensity/5 in 0..1; offsets are in face units.


def _brows(p: _Points, f: dict, a: dict[str, float]) -> None:
    """AU1 raises the inner brow, AU2 the outer brow, AU4 pulls the inner brows down and together."""
    fh, fw = f["fh"], f["fw"]
    for side, sg in SIDES.items():
        b = p.brow[side]
        b["inner"] = b["inner"] + np.array([0.0, -0.10 * fh * a["AU1"]])
        b["peak"] = b["peak"] + np.array([0.0, -0.035 * fh * a["AU1"]])
        b["outer"] = b["outer"] + np.array([0.0, -0.10 * fh * a["AU2"]])
        b["peak"] = b["peak"] + np.array([0.0, -0.06 * fh * a["AU2"]])
        b["inner"] = b["inner"] + np.array([-sg * 0.08 * fw * a["AU4"], 0.09 * fh * a["AU4"]])
        b["peak"] = b["peak"] + np.array([-sg * 0.04 * fw * a["AU4"], 0.07 * fh * a["AU4"]])
        b["outer"] = b["outer"] + np.array([0.0, 0.03 * fh * a["AU4"]])


def _lids(p: _Points, f: dict, a: dict[str, float]) -> None:
    """AU5 raises the upper lid (wider aperture); AU6 pushes the lower lid up (squint) and lifts the cheek."""
    fh = f["fh"]
    for side in SIDES:
        e = p.eye[side]
        e["hu"] = e["hu"] * (1.0 + 1.0 * a["AU5"])
        e["hl"] = e["hl"] * (1.0 - 0.75 * a["AU6"])
        # AU12 lifts the cheek a little too (FACS: strong AU12 raises the infraorbital triangle).
        p.cheek[side] = p.cheek[side] + np.array([0.0, -0.08 * fh * a["AU6"] - 0.025 * fh * a["AU12"]])


def _nose(p: _Points, f: dict, a: dict[str, float]) -> None:
    """AU9 wrinkles the nose: the alae and the upper lip's top edge go up; the tip lifts slightly."""
    fh = f["fh"]
    for side in SIDES:
        p.nostril[side] = p.nostril[side] + np.array([SIDES[side] * 0.03 * f["fw"] * a["AU9"], -0.05 * fh * a["AU9"]])
    p.nose_tip = p.nose_tip + np.array([0.0, -0.015 * fh * a["AU9"]])
    p.upper_th = p.upper_th + 0.05 * fh * a["AU9"]


def _lip_corners(p: _Points, f: dict, a: dict[str, float]) -> None:
    """AU12 pulls the corners up and out, AU15 down, AU20 straight out (and thins the lips)."""
    fh, fw = f["fh"], f["fw"]
    for side, sg in SIDES.items():
        d = np.array([sg * 0.10 * fw * a["AU12"], -0.10 * fh * a["AU12"]])
        d = d + np.array([-sg * 0.02 * fw * a["AU15"], 0.08 * fh * a["AU15"]])
        d = d + np.array([sg * 0.14 * fw * a["AU20"], 0.012 * fh * a["AU20"]])
        p.corner[side] = p.corner[side] + d
    thin = 1.0 - 0.5 * a["AU20"]
    p.upper_th *= thin
    p.lower_th *= thin


def _chin_and_jaw(p: _Points, f: dict, a: dict[str, float]) -> None:
    """AU17 pushes the chin boss and lower lip up; AU25 parts the lips; AU26 drops the jaw (chin, lower lip)."""
    fh, fw = f["fh"], f["fw"]
    push = 0.06 * fh * a["AU17"]
    p.chin_drop -= 0.05 * fh * a["AU17"]
    p.lower_push = push
    p.lower_th = p.lower_th * (1.0 + 0.15 * a["AU17"])
    # The stomion (closed lip line) rises with the pushed lower lip: the AU17 "inverted U" mouth.
    p.stomion = p.stomion + np.array([0.0, -0.6 * push])
    gap25 = 0.075 * fh * a["AU25"]
    jaw = 0.22 * fh * a["AU26"]
    p.upper_open = 0.25 * gap25 + 0.08 * jaw
    p.lower_open = 0.75 * gap25 + 0.85 * jaw
    p.chin_drop += jaw
    for side, sg in SIDES.items():  # an open jaw rounds the mouth: corners a little down and in
        p.corner[side] = p.corner[side] + np.array([-sg * 0.04 * fw * a["AU26"], 0.3 * jaw + 0.15 * gap25])


# ----------------------------------------------------------------------------------------------------
# Curves from the moved points.


def _outline(f: dict, idp: IdentityParams, chin_drop: float, n: int = 96) -> np.ndarray:
    """Head ellipse whose lower half narrows into a jaw; the jaw part follows the chin displacement."""
    cx, cy, fw, fh = f["cx"], f["cy"], f["fw"], f["fh"]
    th = np.linspace(0.0, 2.0 * np.pi, n, endpoint=False)
    s, c = np.sin(th), np.cos(th)
    low = np.clip(s, 0.0, 1.0)
    k = 0.4 - 0.3 * idp.jaw_width                  # how much the jaw narrows
    x = cx + fw * c * (1.0 - k * low**2)
    y = cy + fh * s
    w = np.clip((s - 0.25) / 0.75, 0.0, 1.0) ** 1.5  # jaw weight: 0 above the mouth, 1 at the chin
    y = y + chin_drop * w
    # a square jaw flattens the chin a little
    y = y - 0.05 * fh * idp.jaw_width * np.clip((s - 0.85) / 0.15, 0.0, 1.0)
    return np.stack([x, y], axis=1)


def _eye(e: dict, n: int = 24) -> Eye:
    inner, outer, hu, hl, ew = e["inner"], e["outer"], e["hu"], e["hl"], e["ew"]
    t = np.linspace(0.0, 1.0, n)
    base = inner[None, :] * (1 - t[:, None]) + outer[None, :] * t[:, None]
    up = np.sin(np.pi * t**0.87)      # peak at t=0.45 (the upper lid apex sits toward the nose)
    lo = np.sin(np.pi * t**1.16)      # peak at t=0.55
    upper = base - np.stack([np.zeros(n), hu * up], axis=1)
    lower = base + np.stack([np.zeros(n), hl * lo], axis=1)
    crease = base - np.stack([np.zeros(n), 0.82 * ew * up], axis=1)
    mid = 0.5 * (inner + outer)
    return Eye(inner=inner, outer=outer, upper=upper, lower=lower, crease=crease,
               iris_centre=mid + np.array([0.0, 0.02 * ew]), iris_r=0.47 * ew, width=2 * ew)


def _brow(b: dict, n: int = 20) -> Brow:
    centre = _bezier(b["inner"], b["peak"], b["outer"], n)
    t = np.linspace(0.0, 1.0, n)
    th = b["th"] * (1.0 - 0.55 * t**1.5) * np.clip(t / 0.12, 0.55, 1.0) ** 0.3
    return Brow(centre=centre, thickness=th)


def _mouth(p: _Points, n: int = 33) -> Mouth:
    """Four lip curves sampled at the same t so the renderer can clip teeth column by column."""
    cr, cl = p.corner["right"], p.corner["left"]
    ui = _bezier(cr, p.stomion + np.array([0.0, -p.upper_open]), cl, n)
    li = _bezier(cr, p.stomion + np.array([0.0, p.lower_open]), cl, n)
    li[:, 1] -= p.lower_push * 0.4 * np.sin(np.pi * np.linspace(0, 1, n))  # pushed-up lower lip bulges
    u = np.linspace(-1.0, 1.0, n)
    prof_u = (1 - u**2) ** 0.6 * (1.0 - 0.22 * np.exp(-(u / 0.14) ** 2))    # cupid's bow
    prof_l = (1 - u**2) ** 0.55
    uo = ui - np.stack([np.zeros(n), p.upper_th * prof_u], axis=1)
    lo = li + np.stack([np.zeros(n), p.lower_th * prof_l], axis=1)
    lo[:, 1] -= p.lower_push * 0.6 * np.sin(np.pi * np.linspace(0, 1, n))
    return Mouth(upper_outer=uo, upper_inner=ui, lower_inner=li, lower_outer=lo,
                 gap=float(li[n // 2, 1] - ui[n // 2, 1]))


# Outline indices (of the 96-point outline) of the jaw angle, at sin(theta) = 0.62, roughly mouth height.
_JAW_INDEX = {"left": int(round(np.arcsin(0.62) / (2 * np.pi) * 96)), "right": int(round((np.pi - np.arcsin(0.62)) / (2 * np.pi) * 96))}


def face_geometry(identity: IdentityParams, au: Mapping[str, float] | None, size: int) -> Geometry:
    """Neutral face of `identity`, moved by the AUs, as curves and named landmarks in pixels."""
    a = _intensities(au)
    p, f = _neutral(identity, size)
    _brows(p, f, a)
    _lids(p, f, a)
    _nose(p, f, a)
    _lip_corners(p, f, a)
    _chin_and_jaw(p, f, a)

    eyes = {side: _eye(p.eye[side]) for side in SIDES}
    brows = {side: _brow(p.brow[side]) for side in SIDES}
    mouth = _mouth(p)
    outline = _outline(f, identity, p.chin_drop)
    detail = {
        "forehead_inner": a["AU1"], "forehead_outer": a["AU2"], "glabella": a["AU4"],
        "nose_wrinkle": a["AU9"], "crows_feet": a["AU6"], "cheek_raise": max(a["AU6"], 0.4 * a["AU12"]),
        "nasolabial": float(np.clip(0.25 + 0.7 * a["AU12"] + 0.4 * a["AU9"] + 0.3 * a["AU6"] + 0.2 * a["AU20"], 0, 1)),
        "chin_boss": a["AU17"], "corner_pull": max(a["AU12"], a["AU20"]), "corner_down": a["AU15"],
    }
    g = Geometry(size=size, cx=f["cx"], cy=f["cy"], fw=f["fw"], fh=f["fh"], outline=outline, eyes=eyes,
                 brows=brows, mouth=mouth, nose_w=f["nw"], detail=detail)

    lm: dict[str, np.ndarray] = {}
    for side in SIDES:
        e, b = eyes[side], brows[side]
        lm[f"brow_inner_{side}"] = b.centre[0]
        lm[f"brow_peak_{side}"] = b.centre[len(b.centre) // 2]
        lm[f"brow_outer_{side}"] = b.centre[-1]
        lm[f"eye_inner_{side}"] = e.inner
        lm[f"eye_outer_{side}"] = e.outer
        lm[f"upper_lid_{side}"] = e.upper[np.argmin(e.upper[:, 1] - np.linspace(e.inner[1], e.outer[1], len(e.upper)))]
        lm[f"lower_lid_{side}"] = e.lower[np.argmax(e.lower[:, 1] - np.linspace(e.inner[1], e.outer[1], len(e.lower)))]
        lm[f"pupil_{side}"] = e.iris_centre
        lm[f"cheek_{side}"] = p.cheek[side]
        lm[f"nostril_{side}"] = p.nostril[side]
        lm[f"mouth_corner_{side}"] = p.corner[side]
        # the jaw angle: outline point at mouth height on this side
        lm[f"jaw_{side}"] = outline[_JAW_INDEX[side]]
    mid = len(mouth.upper_outer) // 2
    lm["nose_root"] = p.nose_root
    lm["nose_tip"] = p.nose_tip
    lm["upper_lip_top"] = mouth.upper_outer[mid]
    lm["upper_lip_bottom"] = mouth.upper_inner[mid]
    lm["lower_lip_top"] = mouth.lower_inner[mid]
    lm["lower_lip_bottom"] = mouth.lower_outer[mid]
    lm["chin"] = outline[np.argmax(outline[:, 1])] * np.array([0.0, 1.0]) + np.array([f["cx"], 0.0])
    g.landmarks = {k: np.asarray(v, dtype=np.float64).copy() for k, v in lm.items()}
    return g
