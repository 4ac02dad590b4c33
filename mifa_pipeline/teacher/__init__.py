"""Procedural FACS face renderer: the teacher with exact AU labels. Shares no code with the student model.

    from mifa_pipeline.teacher import sample_identity, render_face
    face = render_face(sample_identity(np.random.default_rng(0)), {"AU12": 4, "AU6": 3}, size=128)
    face.image, face.face_mask, face.landmarks

`identity.py` holds the identity parameters and their sampling, `geometry.py` the neutral face and the AU
controls (one small function per AU group), `render.py` the drawing.
"""

import importlib
from typing import Any

VERSION = "teacher-1"  # the renderer's output version: a build's fingerprint names it (no drawing code imported)

_EXPORTS = {
    "AU_NAMES": "geometry", "Geometry": "geometry", "face_geometry": "geometry",
    "FACIAL_HAIR": "identity", "HAIR_STYLES": "identity", "IdentityParams": "identity", "sample_identity": "identity",
    "Rendered": "render", "render_face": "render",
}
__all__ = ["VERSION", *sorted(_EXPORTS)]


def __getattr__(name: str) -> Any:
    """The renderer's names, imported on first use (PEP 562): reading `VERSION` loads no OpenCV."""
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
