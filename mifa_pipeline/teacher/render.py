"""Drawing of a procedural portrait from a `Geometry`: stylised, but face-like enough for real detectors.

Everything is drawn with OpenCV at `_SS`x the output size (anti-aliased, sub-pixel coordinates) and
downsampled with area averaging. Smooth shading (lighting, shadows, highlights) is drawn at output
resolution into grey layers, blurred once and multiplied onto the skin; fine lines (wrinkles, creases) are
drawn at full resolution into a darkening layer. Nothing here is random except through the identity's
seed, so the same inputs give the same bytes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache

import cv2
import numpy as np

from .geometry import SIDES, Geometry, face_geometry
from .identity import IdentityParams

_SS = 2          # supersampling factor
_SHIFT = 4       # cv2 sub-pixel bits
_AA = cv2.LINE_AA


@dataclass
class Rendered:
    image: np.ndarray                   # uint8 (H, W, 3) RGB
    face_mask: np.ndarray               # uint8 (H, W), 255 = face + head (+ neck) region to regenerate
    landmarks: dict[str, np.ndarray]    # name -> (x, y) in output pixels
    geometry: Geometry


def _c(rgb, k: float = 1.0, add: float = 0.0) -> tuple[float, float, float]:
    return tuple(float(np.clip(v * k + add, 0, 255)) for v in rgb)


class _Canvas:
    """Converts output-pixel coordinates to fixed-point canvas coordinates for anti-aliased drawing."""

    def __init__(self, img: np.ndarray, ss: int):
        self.img, self.ss = img, ss

    def p(self, pts) -> np.ndarray:
        pts = np.asarray(pts, dtype=np.float64).reshape(-1, 2)
        return np.round(((pts + 0.5) * self.ss - 0.5) * (1 << _SHIFT)).astype(np.int32)

    def r(self, v: float) -> int:
        return max(1, int(round(v * self.ss * (1 << _SHIFT))))

    def t(self, v: float) -> int:
        return max(1, int(round(v * self.ss)))

    def fill(self, pts, colour, img=None):
        cv2.fillPoly(self.img if img is None else img, [self.p(pts)], colour, _AA, _SHIFT)

    def line(self, pts, colour, width: float, img=None, closed=False):
        cv2.polylines(self.img if img is None else img, [self.p(pts)], closed, colour, self.t(width), _AA, _SHIFT)

    def ellipse(self, centre, axes, angle, colour, thickness=-1, a0=0, a1=360, img=None):
        c = tuple(int(v) for v in self.p(centre)[0])
        ax = (self.r(axes[0]), self.r(axes[1]))
        th = thickness if thickness < 0 else self.t(thickness)
        cv2.ellipse(self.img if img is None else img, c, ax, angle, a0, a1, colour, th, _AA, _SHIFT)


@lru_cache(maxsize=8)
def _grid(n: int) -> tuple[np.ndarray, np.ndarray]:
    ys, xs = np.mgrid[0:n, 0:n].astype(np.float32)
    return xs, ys


def _chaikin(pts: np.ndarray, iterations: int = 2) -> np.ndarray:
    """Corner-cutting smoothing of an open polyline (end points kept)."""
    for _ in range(iterations):
        q = 0.75 * pts[:-1] + 0.25 * pts[1:]
        r = 0.25 * pts[:-1] + 0.75 * pts[1:]
        mid = np.empty((2 * len(q), 2))
        mid[0::2], mid[1::2] = q, r
        pts = np.vstack([pts[:1], mid, pts[-1:]])
    return pts


def _arc(c, ax, ay, a0, a1, n=24) -> np.ndarray:
    t = np.linspace(a0, a1, n)
    return np.stack([c[0] + ax * np.cos(t), c[1] + ay * np.sin(t)], axis=1)


def _bez(p0, pm, p2, n=12) -> np.ndarray:
    p0, pm, p2 = (np.asarray(v, dtype=np.float64) for v in (p0, pm, p2))
    c = 2.0 * pm - 0.5 * (p0 + p2)
    t = np.linspace(0.0, 1.0, n)[:, None]
    return (1 - t) ** 2 * p0 + 2 * (1 - t) * t * c + t**2 * p2


# ----------------------------------------------------------------------------------------------------
# Hair shapes (identity only; AUs never move hair)


@dataclass
class _Hair:
    back: list[np.ndarray]
    front: np.ndarray | None
    strands: list[np.ndarray]
    front_alpha: float


def _hair(g: Geometry, idp: IdentityParams) -> _Hair:
    rng = np.random.default_rng(idp.seed)
    cx, cy, fw, fh = g.cx, g.cy, g.fw, g.fh
    style = idp.hair_style
    vol = {"short": 0.05, "buzz": 0.012, "long": 0.06, "bob": 0.08, "curly": 0.14, "bun": 0.035}[style] * fh
    hx, hy = fw * 1.06 + vol, fh * 1.04 + vol
    hc = (cx, cy - 0.03 * fh)
    line_y = {"short": 0.52, "buzz": 0.55, "long": 0.5, "bob": 0.36, "curly": 0.45, "bun": 0.6}[style]
    line_y = cy - fh * (line_y + rng.uniform(-0.04, 0.05))
    part = {"short": rng.choice([-0.35, 0.35]), "long": rng.choice([-0.3, 0.0, 0.3]), "bob": 0.0,
            "curly": 0.0, "buzz": 0.0, "bun": 0.0}[style] * fw
    temple = rng.uniform(0.0, 0.12) * fh
    hl = np.array([
        [cx + 1.0 * fw, cy + 0.02 * fh - temple], [cx + 0.95 * fw, cy - 0.3 * fh],
        [cx + 0.62 * fw, line_y + 0.07 * fh], [cx + part, line_y + (0.03 * fh if part else 0.0)],
        [cx - 0.62 * fw, line_y + 0.07 * fh], [cx - 0.95 * fw, cy - 0.3 * fh],
        [cx - 1.0 * fw, cy + 0.02 * fh - temple],
    ])
    if style == "bob":   # straight fringe
        hl[2:5, 1] = line_y
    hairline = _chaikin(hl, 3)
    a0 = 0.12
    outer = _arc(hc, hx, hy, np.pi - a0, 2 * np.pi + a0, 40)
    front = np.vstack([outer, hairline])   # outer arc left -> right, then the hairline right -> left

    back: list[np.ndarray] = []
    if style in ("long", "bob"):
        bottom = cy + (1.55 if style == "long" else 0.8) * fh
        wide = hx * (1.02 if style == "long" else 1.08)
        top = _arc(hc, wide, hy, np.pi, 2 * np.pi, 30)
        right = np.array([[cx + wide, hc[1] + 0.4 * fh], [cx + wide * 1.02, bottom - 0.2 * fh],
                          [cx + wide * 0.9, bottom], [cx + 0.4 * fw, bottom + 0.04 * fh]])
        left = right[::-1] * np.array([-1.0, 1.0]) + np.array([2 * cx, 0.0])
        back.append(np.vstack([top, right, left]))
    elif style == "curly":
        c = np.array([cx, cy - 0.12 * fh])
        back.append(_arc(c, fw * 1.42, fh * 1.2, 0, 2 * np.pi, 48))
        for k in range(22):   # bumpy silhouette
            t = np.pi * (0.85 + 1.3 * k / 21) + rng.uniform(-0.05, 0.05)
            rr = rng.uniform(0.14, 0.22) * fw
            pc = c + np.array([fw * 1.38 * np.cos(t), fh * 1.16 * np.sin(t)])
            back.append(_arc(pc, rr, rr, 0, 2 * np.pi, 12))
    elif style == "bun":
        r = rng.uniform(0.28, 0.36) * fw
        back.append(_arc((cx, cy - fh * 1.02 - 0.6 * r), r, r, 0, 2 * np.pi, 24))

    strands = []
    for _ in range(14 if style != "buzz" else 0):
        i = rng.integers(4, len(hairline) - 4)
        s0 = hairline[i]
        end = np.array([cx + 0.3 * (s0[0] - cx) + rng.uniform(-0.1, 0.1) * fw, cy - fh * rng.uniform(0.95, 1.05)])
        mid = 0.5 * (s0 + end) + np.array([np.sign(s0[0] - cx) * 0.12 * fw, -0.05 * fh])
        strands.append(_bez(s0 + np.array([0, -0.02 * fh]), mid, end, 10))
    return _Hair(back=back, front=front, strands=strands, front_alpha=0.6 if style == "buzz" else 1.0)


# ----------------------------------------------------------------------------------------------------
# Drawing passes


def _background(n: int, rgb) -> np.ndarray:
    xs, ys = _grid(n)
    v = (1.1 - 0.3 * ys / n - 0.12 * ((xs / n - 0.45) ** 2 + (ys / n - 0.35) ** 2))[..., None]
    return np.clip(np.asarray(rgb, dtype=np.float32) * v, 0, 255).astype(np.uint8)


def _body(cv: _Canvas, g: Geometry, idp: IdentityParams, skin_mask: np.ndarray, hair_mask: np.ndarray) -> None:
    s, cx, cy, fw, fh = g.size, g.cx, g.cy, g.fw, g.fh
    shoulders = ((cx, s * 1.12), (0.5 * s * (0.9 + 0.1 * idp.face_width), 0.26 * s))
    cv.ellipse(*shoulders, 0, idp.clothing_colour)
    cv.ellipse(*shoulders, 0, 0, img=hair_mask)
    neck_top = cy + 0.45 * fh
    neck_w = 0.5 * fw * (0.9 + 0.2 * idp.jaw_width)
    collar = s * 0.9
    neck = np.vstack([
        [[cx - neck_w, neck_top], [cx - neck_w * 1.05, collar - 0.05 * s]],
        _arc((cx, collar - 0.05 * s), neck_w * 1.05, 0.06 * s, np.pi, 0, 16),
        [[cx + neck_w, neck_top]],
    ])
    skin = _c(idp.skin, 0.92)
    cv.fill(neck, skin)
    cv.fill(neck, 255, img=skin_mask)
    cv.fill(neck, 0, img=hair_mask)
    cv.line(_arc((cx, collar - 0.05 * s), neck_w * 1.12, 0.075 * s, np.pi * 0.98, 0.02 * np.pi, 16),
            _c(idp.clothing_colour, 0.7), 0.012 * s)


def _head(cv: _Canvas, g: Geometry, idp: IdentityParams, skin_mask: np.ndarray, hair_mask: np.ndarray) -> None:
    cx, cy, fw, fh = g.cx, g.cy, g.fw, g.fh
    for sg in (1.0, -1.0):
        c = (cx + sg * 0.98 * fw, cy + 0.12 * fh)
        cv.ellipse(c, (0.13 * fw, 0.2 * fh), -sg * 8, _c(idp.skin, 0.93))
        cv.ellipse(c, (0.13 * fw, 0.2 * fh), -sg * 8, 255, img=skin_mask)
        cv.ellipse(c, (0.13 * fw, 0.2 * fh), -sg * 8, 0, img=hair_mask)
        cv.ellipse((c[0] - sg * 0.01 * fw, c[1]), (0.07 * fw, 0.13 * fh), -sg * 8, _c(idp.skin, 0.72),
                   thickness=0.01 * fh, a0=-100 if sg > 0 else -80, a1=100 if sg > 0 else 260)
    cv.fill(g.outline, _c(idp.skin))
    cv.fill(g.outline, 255, img=skin_mask)
    cv.fill(g.outline, 0, img=hair_mask)


def _shade_layers(g: Geometry, idp: IdentityParams, hair: _Hair) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Smooth shadows, highlights and hair sheen at output resolution (blurred): the 3-D look of the head."""
    s = g.size
    sh = np.zeros((s, s), np.uint8)
    hi = np.zeros((s, s), np.uint8)
    hs = np.zeros((s, s), np.uint8)
    cv = _Canvas(sh, 1)
    cx, cy, fw, fh, d, lm = g.cx, g.cy, g.fw, g.fh, g.detail, g.landmarks
    for side, sg in SIDES.items():
        e = g.eyes[side]
        mid = 0.5 * (e.inner + e.outer)
        cv.ellipse(mid + np.array([-sg * 0.1 * e.width, -0.12 * e.width]), (0.75 * e.width, 0.5 * e.width), 0, 80)
        # nasolabial fold: from beside the ala to beyond the mouth corner
        a = lm[f"nostril_{side}"] + np.array([sg * 0.9 * g.nose_w, -0.02 * fh])
        b = lm[f"mouth_corner_{side}"] + np.array([sg * 0.1 * fw, 0.07 * fh])
        m = 0.5 * (a + b) + np.array([sg * 0.1 * fw, 0.0])
        cv.line(_bez(a, m, b), int(150 * d["nasolabial"]), 0.03 * fh)
        # cheek bulge: highlight on the cheek, and a shadow under it when raised (AU6)
        ck = lm[f"cheek_{side}"]
        cv.ellipse(ck, (0.28 * fw, 0.15 * fh), 0, int(70 + 90 * d["cheek_raise"]), img=hi)
        cv.ellipse(ck + np.array([0, 0.05 * fh]), (0.3 * fw, 0.15 * fh), 0, int(130 * d["cheek_raise"]),
                   thickness=0.03 * fh, a0=20, a1=160)
    # nose: shadow side (light comes from the image's upper left), under-nose shadow, bridge highlight
    tip, root = lm["nose_tip"], lm["nose_root"]
    cv.line([root + np.array([0.35 * g.nose_w, 0.0]), lm["nostril_left"] + np.array([0.35 * g.nose_w, -0.06 * fh])],
            120, 0.05 * fh)
    cv.line([root + np.array([-0.35 * g.nose_w, 0.0]), lm["nostril_right"] + np.array([-0.35 * g.nose_w, -0.06 * fh])],
            45, 0.04 * fh)
    cv.ellipse(tip + np.array([0.0, 0.07 * fh]), (0.7 * g.nose_w, 0.035 * fh), 0, 120)
    cv.line([root + np.array([-0.05 * g.nose_w, 0.05 * fh]), tip + np.array([-0.05 * g.nose_w, -0.06 * fh])], 90,
            0.035 * fh, img=hi)
    cv.ellipse(tip + np.array([-0.05 * g.nose_w, -0.01 * fh]), (0.3 * g.nose_w, 0.25 * g.nose_w), 0, 130, img=hi)
    # mouth surroundings, chin boss (AU17 lifts and bunches it)
    mw = 0.5 * (lm["mouth_corner_left"][0] - lm["mouth_corner_right"][0])
    llb = lm["lower_lip_bottom"]
    cv.ellipse(llb + np.array([0.0, 0.045 * fh]), (0.55 * mw, (0.035 + 0.02 * d["chin_boss"]) * fh), 0,
               int(90 + 70 * d["chin_boss"]))
    chin = lm["chin"]
    cv.ellipse(chin + np.array([-0.03 * fw, -0.1 * fh]), (0.3 * fw, 0.07 * fh), 0, int(60 + 60 * d["chin_boss"]), img=hi)
    for side, sg in SIDES.items():
        c = lm[f"mouth_corner_{side}"]
        cv.ellipse(c + np.array([sg * 0.03 * fw, 0.0]), (0.04 * fw, 0.03 * fh), 0, 110)
    # forehead highlight, hairline shadow, shadow under the jaw (on the neck)
    cv.ellipse((cx - 0.12 * fw, cy - 0.45 * fh), (0.38 * fw, 0.2 * fh), 0, 70, img=hi)
    if hair.front is not None and hair.front_alpha >= 1.0:
        cv.line(hair.front[40:], 70, 0.06 * fh)
    low = g.outline[(g.outline[:, 1] > cy + 0.35 * fh)]
    low = low[np.argsort(low[:, 0])]
    cv.fill(np.vstack([low, (low + np.array([0.0, 0.14 * fh]))[::-1]]), 170)
    # hair sheen: light from the upper left
    cv.ellipse((cx - 0.35 * fw, cy - 0.8 * fh), (0.45 * fw, 0.16 * fh), -35, 255, img=hs)
    cv.ellipse((cx + 0.5 * fw, cy - 0.7 * fh), (0.3 * fw, 0.12 * fh), 35, 120, img=hs)
    if idp.facial_hair in ("beard", "goatee"):
        cv.ellipse(lm["chin"] + np.array([-0.1 * fw, -0.12 * fh]), (0.3 * fw, 0.1 * fh), -20, 150, img=hs)
    sigma = 0.018 * s
    return (cv2.GaussianBlur(sh, (0, 0), sigma), cv2.GaussianBlur(hi, (0, 0), sigma * 1.3),
            cv2.GaussianBlur(hs, (0, 0), sigma * 2))


def _details(g: Geometry, n: int, mole: tuple[float, float] | None) -> np.ndarray:
    """Fine creases and wrinkles, drawn sharp at canvas resolution into a darkening layer."""
    det = np.zeros((n, n), np.uint8)
    cv = _Canvas(det, _SS)
    cx, cy, fw, fh, d, lm = g.cx, g.cy, g.fw, g.fh, g.detail, g.landmarks
    lw = 0.011 * fh
    for side, sg in SIDES.items():
        e = g.eyes[side]
        cv.line(e.crease[3:-2], 110, lw)
        cv.line(e.lower[3:-3] + np.array([0.0, 0.16 * e.width + 0.0]), int(40 + 110 * d["crows_feet"]), lw)
        if d["crows_feet"] > 0:
            o = e.outer + np.array([sg * 0.15 * e.width, 0.0])
            for ang in (-0.45, 0.0, 0.45):
                v = np.array([sg * np.cos(ang), np.sin(ang)]) * 0.4 * e.width
                cv.line([o, o + v], int(170 * d["crows_feet"]), lw)
        if d["corner_pull"] > 0:   # dimple/crease beside a pulled corner
            c = lm[f"mouth_corner_{side}"]
            cv.line(_bez(c + np.array([sg * 0.05 * fw, -0.04 * fh]), c + np.array([sg * 0.08 * fw, 0.0]),
                         c + np.array([sg * 0.05 * fw, 0.04 * fh]), 8), int(150 * d["corner_pull"]), lw)
        if d["corner_down"] > 0:   # lines below depressed corners
            c = lm[f"mouth_corner_{side}"]
            cv.line([c + np.array([sg * 0.03 * fw, 0.02 * fh]), c + np.array([sg * 0.06 * fw, 0.12 * fh])],
                    int(150 * d["corner_down"]), lw)
    # forehead lines follow the brows: inner part with AU1, lateral parts with AU2
    by = min(lm["brow_peak_left"][1], lm["brow_peak_right"][1])
    for k in range(3):
        y = by - (0.07 + 0.065 * k) * fh
        if d["forehead_inner"] > 0:
            cv.line(_bez((cx - 0.3 * fw, y + 0.015 * fh), (cx, y), (cx + 0.3 * fw, y + 0.015 * fh), 10),
                    int(150 * d["forehead_inner"]), lw)
        if d["forehead_outer"] > 0:
            for sg in (1.0, -1.0):
                cv.line(_bez((cx + sg * 0.28 * fw, y + 0.01 * fh), (cx + sg * 0.45 * fw, y - 0.01 * fh),
                             (cx + sg * 0.62 * fw, y + 0.02 * fh), 8), int(150 * d["forehead_outer"]), lw)
    if d["glabella"] > 0:
        bi = 0.5 * (lm["brow_inner_left"][1] + lm["brow_inner_right"][1])
        for sg in (1.0, -1.0):
            x = cx + sg * 0.07 * fw
            cv.line([(x, bi - 0.07 * fh), (x - sg * 0.01 * fw, bi + 0.03 * fh)], int(190 * d["glabella"]), lw * 1.2)
        cv.line([(cx - 0.06 * fw, bi + 0.06 * fh), (cx + 0.06 * fw, bi + 0.06 * fh)], int(120 * d["glabella"]), lw)
    if d["nose_wrinkle"] > 0:
        r, t = lm["nose_root"], lm["nose_tip"]
        for k in range(3):
            y = r[1] + (0.12 + 0.12 * k) * (t[1] - r[1])
            w = g.nose_w * (0.45 + 0.15 * k)
            cv.line(_bez((cx - w, y + 0.01 * fh), (cx, y - 0.005 * fh), (cx + w, y + 0.01 * fh), 8),
                    int(190 * d["nose_wrinkle"]), lw)
        for sg in (1.0, -1.0):
            cv.line([(cx + sg * 0.7 * g.nose_w, r[1] + 0.5 * (t[1] - r[1])), (cx + sg * 1.05 * g.nose_w, t[1] - 0.04 * fh)],
                    int(170 * d["nose_wrinkle"]), lw)
    if d["chin_boss"] > 0:
        chin = lm["chin"]
        rng = np.random.default_rng(7)   # fixed stipple pattern: same for every face
        for _ in range(9):
            q = chin + np.array([rng.uniform(-0.22, 0.22) * fw, -rng.uniform(0.08, 0.2) * fh])
            cv.ellipse(q, (0.02 * fw, 0.012 * fh), 0, int(120 * d["chin_boss"]), thickness=lw, a0=200, a1=340)
    if mole is not None:
        cv.ellipse((cx + mole[0] * fw, cy + mole[1] * fh), (0.012 * fh, 0.012 * fh), 0, 200)
    # nasolabial crease and the chin's mentolabial sulcus
    for side, sg in SIDES.items():
        a = lm[f"nostril_{side}"] + np.array([sg * 0.95 * g.nose_w, -0.01 * fh])
        b = lm[f"mouth_corner_{side}"] + np.array([sg * 0.09 * fw, 0.06 * fh])
        m = 0.5 * (a + b) + np.array([sg * 0.07 * fw, 0.0])
        cv.line(_bez(a, m, b, 12), int(120 * d["nasolabial"]), lw)
    return det


def _facial_hair(cv: _Canvas, g: Geometry, idp: IdentityParams, skin_mask: np.ndarray,
                 hair_mask: np.ndarray) -> None:
    """Stubble, moustache, goatee or beard (soft-edged); they follow the mouth and jaw, so AUs move them too.
    Drawn before the lighting pass and moved from the skin mask to the hair mask, so they get the hair sheen."""
    style = idp.facial_hair
    if style == "none":
        return
    cx, cy, fw, fh, lm, m = g.cx, g.cy, g.fw, g.fh, g.landmarks, g.mouth
    n = cv.img.shape[0]
    mask = np.zeros((n, n), np.uint8)
    mc = _Canvas(mask, _SS)
    y0 = 0.5 * (lm["nostril_left"][1] + lm["upper_lip_top"][1]) - 0.005 * fh
    top = _bez(m.upper_outer[0] + np.array([-0.04 * fw, 0.025 * fh]), (cx, y0),
               m.upper_outer[-1] + np.array([0.04 * fw, 0.025 * fh]), 16)
    stache = np.vstack([top, (m.upper_outer + np.array([0.0, -0.004 * fh]))[::-1]])
    low = g.outline[g.outline[:, 1] > cy + 0.15 * fh]
    low = low[np.argsort(-low[:, 0])]            # image right -> left, along the jaw
    if style in ("stubble", "beard"):
        low = low[low[:, 1] > cy + 0.36 * fh]      # the beard starts below the ears
        edge = low + (low - np.array([cx, cy])) * (0.04 if style == "beard" else 0.0)  # beard volume
        ly = lm["upper_lip_top"][1]
        half = np.array([edge[0], (cx + 0.55 * fw, ly + 0.07 * fh), (cx + 0.3 * fw, y0 + 0.01 * fh), (cx, y0)])
        cheek = _chaikin(np.vstack([half, (half[-2::-1] - np.array([cx, 0.0])) * np.array([-1.0, 1.0])
                                    + np.array([cx, 0.0])]), 2)
        cheek[-1] = edge[-1]
        mc.fill(np.vstack([edge, cheek[::-1]]), 255)
    else:
        mc.fill(stache, 255)
        if style == "goatee":
            lob = m.lower_outer
            mc.fill(np.vstack([lob[6:-6] + np.array([0.0, 0.01 * fh]),
                               _bez(lob[-7], lm["chin"] + np.array([0.0, 0.02 * fh]), lob[6], 12)]), 255)
    alpha, soft = {"stubble": (0.32, 0.02), "beard": (0.85, 0.006)}.get(style, (0.9, 0.003))
    ys = slice(int(max(0, (cy - 0.1 * fh) * _SS)), n)
    m = cv2.GaussianBlur(mask[ys], (0, 0), soft * n)
    a = m.astype(np.float32)[..., None] * (alpha / 255)
    colour = np.array(_c(idp.hair_colour, 0.9), np.float32)
    cv.img[ys] = (cv.img[ys] * (1 - a) + colour * a).astype(np.uint8)
    if style != "stubble":
        hair_mask[ys] = np.maximum(hair_mask[ys], m)
        skin_mask[ys] = np.minimum(skin_mask[ys], 255 - m)
        # texture: short downward strokes, light and dark, where the hair is dense (fixed per identity)
        rng = np.random.default_rng(idp.seed + 1)
        pts = np.stack([cx + rng.uniform(-1.1, 1.1, 240) * fw, cy + rng.uniform(0.1, 1.3, 240) * fh], 1)
        ij = np.round((pts + 0.5) * _SS - 0.5).astype(int)
        ok = (ij[:, 1] >= ys.start) & (ij[:, 1] < n) & (ij[:, 0] >= 0) & (ij[:, 0] < n)
        ok[ok] = mask[ij[ok, 1], ij[ok, 0]] > 200
        pts = pts[ok]
        d = np.stack([0.25 * (pts[:, 0] - cx) / fw, np.ones(len(pts))], 1) * (0.035 * fh)
        for k, col in enumerate((_c(idp.hair_colour, 1.35, 22), _c(idp.hair_colour, 0.55))):
            segs = [cv.p(np.array([q, q + dd])) for q, dd in zip(pts[k::2], d[k::2])]
            if segs:
                cv2.polylines(cv.img, segs, False, col, 1, _AA, _SHIFT)


def _eyes(cv: _Canvas, g: Geometry, idp: IdentityParams) -> None:
    n = cv.img.shape[0]
    for side, sg in SIDES.items():
        e = g.eyes[side]
        poly = np.vstack([e.upper, e.lower[::-1]])
        lo = np.floor((poly.min(0) - 2) * _SS).astype(int).clip(0, n - 1)
        hi = np.ceil((poly.max(0) + 2) * _SS).astype(int).clip(1, n)
        roi = cv.img[lo[1]:hi[1], lo[0]:hi[0]]
        sub = _Canvas(roi.copy(), _SS)

        def P(a, off=lo / _SS):  # output coordinates relative to the ROI (ROI pixel 0 = canvas pixel lo)
            return np.asarray(a, dtype=np.float64) - off

        sub.img[:] = (236, 232, 226)
        sub.line(P(e.upper), (200, 188, 184), 0.35 * e.width * 0.3)
        sub.ellipse(P(e.iris_centre), (e.iris_r, e.iris_r), 0, _c(idp.eye_colour, 0.55))
        sub.ellipse(P(e.iris_centre), (0.82 * e.iris_r, 0.82 * e.iris_r), 0, _c(idp.eye_colour))
        sub.ellipse(P(e.iris_centre + np.array([0.0, 0.15 * e.iris_r])), (0.5 * e.iris_r, 0.45 * e.iris_r), 0,
                    _c(idp.eye_colour, 1.25, 12))
        sub.ellipse(P(e.iris_centre), (0.42 * e.iris_r, 0.42 * e.iris_r), 0, (14, 12, 12))
        sub.ellipse(P(e.iris_centre + np.array([-0.35, -0.35]) * e.iris_r), (0.16 * e.iris_r, 0.16 * e.iris_r), 0,
                    (250, 250, 250))
        m = np.zeros(roi.shape[:2], np.uint8)
        mc = _Canvas(m, _SS)
        mc.fill(P(poly), 255)
        a = (m.astype(np.float32) / 255.0)[..., None]
        roi[:] = (roi * (1 - a) + sub.img * a).astype(np.uint8)
        # lids: lash line on the upper lid, thin lower lid line
        lash = (22, 18, 18)
        cv.line(e.upper, lash, 0.075 * e.width)
        cv.line(e.upper[len(e.upper) // 2:], lash, 0.1 * e.width)
        cv.line(e.lower[1:], _c(idp.skin, 0.62), 0.035 * e.width)
        cv.line([e.outer, e.outer + np.array([sg * 0.12 * e.width, -0.08 * e.width])], lash, 0.06 * e.width)


def _brows(cv: _Canvas, g: Geometry, idp: IdentityParams) -> None:
    for side in SIDES:
        b = g.brows[side]
        c = b.centre
        tang = np.gradient(c, axis=0)
        tang /= np.linalg.norm(tang, axis=1, keepdims=True) + 1e-9
        nrm = np.stack([-tang[:, 1], tang[:, 0]], axis=1)
        half = (b.thickness / 2)[:, None]
        poly = np.vstack([c + nrm * half, (c - nrm * half)[::-1]])
        cv.fill(poly, _c(idp.brow_colour))


def _nose(cv: _Canvas, g: Geometry, idp: IdentityParams) -> None:
    lm, nw, fh = g.landmarks, g.nose_w, g.fh
    for side, sg in SIDES.items():
        c = lm[f"nostril_{side}"]
        cv.ellipse(c, (0.3 * nw, 0.13 * nw), sg * 18, _c(idp.skin, 0.32))
        cv.ellipse(c + np.array([sg * 0.25 * nw, -0.05 * fh]), (0.42 * nw, 0.5 * nw), 0, _c(idp.skin, 0.68),
                   thickness=0.014 * fh, a0=-80 if sg > 0 else 120, a1=60 if sg > 0 else 260)
    tip = lm["nose_tip"]
    cv.line(_bez(tip + np.array([-0.3 * nw, 0.035 * fh]), tip + np.array([0, 0.05 * fh]),
                 tip + np.array([0.3 * nw, 0.035 * fh]), 8), _c(idp.skin, 0.78), 0.01 * fh)


def _mouth(cv: _Canvas, g: Geometry, idp: IdentityParams) -> None:
    m, fh = g.mouth, g.fh
    n = len(m.upper_inner)
    lip = idp.lip_colour
    if m.gap > 0.15:
        cav = np.vstack([m.upper_inner, m.lower_inner[::-1]])
        cv.fill(cav, (52, 16, 22))
        gapy = m.lower_inner[:, 1] - m.upper_inner[:, 1]
        tongue_top = m.lower_inner - np.stack([np.zeros(n), np.minimum(0.35 * gapy, 0.05 * fh)], 1)
        cv.fill(np.vstack([m.lower_inner[3:-3], tongue_top[3:-3][::-1]]), (150, 64, 72))
        k0, k1 = 3, n - 3
        ui, li = m.upper_inner[k0:k1], m.lower_inner[k0:k1]
        tb = np.minimum(ui[:, 1] + 0.075 * fh, li[:, 1])
        teeth = np.vstack([ui, np.stack([ui[:, 0], tb], 1)[::-1]])
        cv.fill(teeth, (232, 228, 218))
        lt = np.maximum(li[:, 1] - 0.045 * fh, tb)
        low = np.vstack([np.stack([li[:, 0], lt], 1), li[::-1]])
        cv.fill(low[2:-2] if len(low) > 8 else low, (205, 200, 190))
        mid = n // 2
        cv.line([m.upper_inner[mid], (m.upper_inner[mid][0], tb[mid - k0])], (180, 170, 160), 0.006 * fh)
    cv.fill(np.vstack([m.upper_outer, m.upper_inner[::-1]]), _c(lip, 0.8))
    cv.fill(np.vstack([m.lower_inner, m.lower_outer[::-1]]), _c(lip))
    a, b = n // 4, n - n // 4
    hl_top = m.lower_inner[a:b] * 0.65 + m.lower_outer[a:b] * 0.35
    hl_bot = m.lower_inner[a:b] * 0.25 + m.lower_outer[a:b] * 0.75
    cv.fill(np.vstack([hl_top, hl_bot[::-1]]), _c(lip, 1.12, 8))
    cv.line(m.upper_inner if m.gap <= 0.15 else m.upper_inner[:2], _c(lip, 0.42), 0.014 * fh)


def _hair_draw(cv: _Canvas, polys: list[np.ndarray], colour, img=None) -> None:
    for p in polys:
        cv.fill(p, colour, img=img)


def render_face(identity: IdentityParams, au: Mapping[str, float] | None = None, size: int = 128) -> Rendered:
    """Render `identity` showing the AU intensities `au` (0..5, missing = 0) as a size x size RGB portrait."""
    g = face_geometry(identity, au, size)
    n = size * _SS
    img = _background(n, identity.background_colour)
    cv = _Canvas(img, _SS)
    hair = _hair(g, identity)
    hair_col = identity.hair_colour
    skin_mask = np.zeros((n, n), np.uint8)
    hair_mask = np.zeros((n, n), np.uint8)
    _hair_draw(cv, hair.back, _c(hair_col, 0.78))
    _hair_draw(cv, hair.back, 255, img=hair_mask)
    _body(cv, g, identity, skin_mask, hair_mask)
    _head(cv, g, identity, skin_mask, hair_mask)
    if hair.front is not None:
        if hair.front_alpha < 1.0:    # stubble-short hair: skin shows through, and is lit as skin
            layer = img.copy()
            cv.fill(hair.front, _c(hair_col), img=layer)
            cv2.addWeighted(layer, hair.front_alpha, img, 1 - hair.front_alpha, 0, dst=img)
        else:
            cv.fill(hair.front, _c(hair_col))
            for k, s in enumerate(hair.strands):
                cv.line(s, _c(hair_col, 0.72 if k % 2 else 1.2, 0 if k % 2 else 10), 0.008 * g.fh)
            cv.fill(hair.front, 0, img=skin_mask)
            cv.fill(hair.front, 255, img=hair_mask)

    _facial_hair(cv, g, identity, skin_mask, hair_mask)

    # Lighting: skin gets light x shadows x highlights x creases (+ a little additive sheen so dark skin
    # shows its shape); hair gets a sheen. Computed at output resolution, upsampled, applied once.
    xs, ys = _grid(size)
    dx, dy = (xs - g.cx) / g.fw, (ys - g.cy) / g.fh
    light = np.clip(1.08 - 0.1 * dx - 0.05 * dy - 0.16 * (dx * dx + dy * dy) ** 2, 0.5, 1.15)
    sh, hi, hs = _shade_layers(g, identity, hair)
    f_skin = light * (1.0 - 0.85 / 255 * sh) * (1.0 + 0.14 / 255 * hi)
    f_hair = (0.75 + 0.25 * light) * (1.0 + 0.35 / 255 * hs)
    up = lambda x: cv2.resize(x, (n, n), interpolation=cv2.INTER_LINEAR)  # noqa: E731
    a_s = skin_mask.astype(np.float32) * (1.0 / 255)
    a_h = hair_mask.astype(np.float32) * (1.0 / 255)
    f = 1.0 + a_s * (up(f_skin) * (1.0 - 0.45 / 255 * _details(g, n, identity.mole).astype(np.float32)) - 1.0) + a_h * (up(f_hair) - 1.0)
    add = a_s * up(hi.astype(np.float32) * (20.0 / 255)) + a_h * up(hs.astype(np.float32) * (30.0 / 255))
    img[:] = np.clip(img * f[..., None] + add[..., None], 0, 255).astype(np.uint8)

    _eyes(cv, g, identity)
    _brows(cv, g, identity)
    _nose(cv, g, identity)
    _mouth(cv, g, identity)
    out = cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA)
    return Rendered(image=out, face_mask=_face_mask(g, hair), landmarks=g.landmarks, geometry=g)


def _face_mask(g: Geometry, hair: _Hair) -> np.ndarray:
    """Head region (face, ears, hair, neck) at output resolution, slightly dilated; 255 inside."""
    s = g.size
    m = np.zeros((s, s), np.uint8)
    cv = _Canvas(m, 1)
    cv.fill(g.outline, 255)
    for sg in (1.0, -1.0):
        cv.ellipse((g.cx + sg * 0.98 * g.fw, g.cy + 0.12 * g.fh), (0.14 * g.fw, 0.21 * g.fh), 0, 255)
    for p in hair.back:
        cv.fill(p, 255)
    if hair.front is not None:
        cv.fill(hair.front, 255)
    neck_w = 0.55 * g.fw
    cv.fill([(g.cx - neck_w, g.cy + 0.5 * g.fh), (g.cx + neck_w, g.cy + 0.5 * g.fh),
             (g.cx + neck_w, g.cy + 1.3 * g.fh), (g.cx - neck_w, g.cy + 1.3 * g.fh)], 255)
    m = np.where(m >= 128, 255, 0).astype(np.uint8)
    k = max(3, (s // 64) | 1)
    return cv2.dilate(m, np.ones((k, k), np.uint8))
