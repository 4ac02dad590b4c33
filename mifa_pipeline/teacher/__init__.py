"""Procedural FACS face renderer: the teacher with exact AU labels. Shares no code with the student model.

    from mifa_pipeline.teacher import sample_identity, render_face
    face = render_face(sample_identity(np.random.default_rng(0)), {"AU12": 4, "AU6": 3}, size=128)
    face.image, face.face_mask, face.landmarks

`identity.py` holds the identity parameters and their sampling, `geometry.py` the neutral face and the AU
controls (one small function per AU group), `render.py` the drawing.
"""

from .geometry import AU_NAMES, Geometry, face_geometry
from .identity import FACIAL_HAIR, HAIR_STYLES, IdentityParams, sample_identity
from .render import Rendered, render_face

__all__ = [
    "AU_NAMES", "FACIAL_HAIR", "HAIR_STYLES", "Geometry", "IdentityParams", "Rendered", "face_geometry", "render_face",
    "sample_identity",
]
