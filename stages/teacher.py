"""Stage 3 with the procedural teacher in place of MAUGen: faces whose AU labels are exact by construction.

`mifa teacher` is a build whose generator is this class: the same prompts, identities, filtering,
shards, resume and run manifest, so a teacher data set is read and trained on exactly like a MAUGen one.
An identity's look comes from its reference seed (`IdentityRecord.seed`); stage 1 describes that look
in words (`describe`), so every prompt says what the image shows.
"""

from __future__ import annotations

import time
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from mifa_pipeline.records import IdentityRecord, SampleRecord, StageStats
from mifa_pipeline.teacher import VERSION, AU_NAMES, IdentityParams, render_face, sample_identity

if TYPE_CHECKING:
    from mifa_pipeline.storage import Location

# Named colours for describing a rendered identity (nearest in RGB).
_COLOUR_NAMES = {
    "black": (25, 20, 18), "dark brown": (60, 40, 28), "brown": (110, 74, 45), "auburn": (150, 70, 36),
    "blond": (215, 185, 125), "grey": (150, 146, 140), "white": (225, 223, 220), "red": (190, 50, 50),
    "orange": (220, 130, 50), "yellow": (220, 200, 70), "green": (70, 150, 80), "teal": (60, 140, 140),
    "blue": (60, 90, 170), "purple": (120, 70, 150), "pink": (220, 130, 170), "beige": (210, 195, 160),
    "hazel": (118, 102, 52), "navy": (35, 45, 90),
}
_EYE_NAMES = ("brown", "dark brown", "hazel", "green", "blue", "grey")
_SKIN_WORDS = ((200, "very light"), (175, "light"), (145, "medium"), (115, "tan"), (85, "brown"), (0, "dark brown"))
_HAIR_STYLE_WORDS = {"short": "short", "long": "long", "bob": "bob-cut", "curly": "curly", "buzz": "buzz-cut",
                     "bun": "tied-up"}


def _colour_name(rgb, allowed=None) -> str:
    names = allowed or tuple(_COLOUR_NAMES)
    c = np.asarray(rgb, dtype=np.float64)
    return min(names, key=lambda n: float(np.sum((c - np.asarray(_COLOUR_NAMES[n])) ** 2)))


def identity_params(reference_seed: int) -> IdentityParams:
    return sample_identity(np.random.default_rng(reference_seed))


# The identity's shape, as numbers: what `mifa train --identity-attribute-weight` teaches the <ID> words.
SHAPE_ATTRIBUTES: tuple[str, ...] = tuple(f.name for f in fields(IdentityParams) if f.type in (float, "float"))
ATTRIBUTES_FILE = "identity_attributes.parquet"


def write_identity_attributes(out: "Location | str | Path") -> str:
    """``identity_attributes.parquet`` beside a teacher data set's shards (a folder or any storage URL): per
    identity, its shape parameters; returns where it was written.

    Why: the teacher knows each face's eye, brow, nose and mouth geometry exactly, and an identity encoder
    trained only to tell identities apart learns their colours instead (a linear probe from the demo
    model's words to these parameters: R^2 ~ 0). Reads only ``identity`` and ``seed`` of the identity table
    the build publishes beside its shards (``OUT/identities.parquet``; never ``OUT/_work``), and raises
    FileNotFoundError when it is missing. Every row is kept, duplicate identities too (their samples were
    dropped, so nothing reads their row: harmless, and simpler than filtering). Columns: ``identity`` (as in
    the shards) and one float column per name in ``SHAPE_ATTRIBUTES``. Written whole or not at all
    (`Location.write_parquet`); rewriting it gives the same bytes.
    """
    import pyarrow as pa

    from mifa_pipeline.storage import location

    out = location(out)
    if not out.isfile("identities.parquet"):
        raise FileNotFoundError(f"{out}: no identities.parquet (a data set built by mifa before the shard "
                                "redesign? rebuild it)")
    rows = sorted({(int(r["identity"]), int(r["seed"]))
                   for r in out.read_parquet("identities.parquet", columns=["identity", "seed"]).to_pylist()})
    params = [identity_params(seed) for _, seed in rows]
    columns = {"identity": pa.array([i for i, _ in rows], pa.int64())}
    for name in SHAPE_ATTRIBUTES:
        columns[name] = pa.array([float(getattr(p, name)) for p in params], pa.float64())
    out.write_parquet(ATTRIBUTES_FILE, pa.table(columns))
    return out.full_url(ATTRIBUTES_FILE)


def describe(reference_seed: int) -> dict[str, str]:
    """Words for what the teacher will draw for this identity (used as its demographics)."""
    p = identity_params(reference_seed)
    lightness = float(np.mean(p.skin))
    skin = next(word for threshold, word in _SKIN_WORDS if lightness >= threshold)
    return {
        "skin": f"{skin} skin",
        "hair": f"{_HAIR_STYLE_WORDS[p.hair_style]} {_colour_name(p.hair_colour)} hair",
        "eyes": f"{_colour_name(p.eye_colour, _EYE_NAMES)} eyes",
        "clothing": f"a {_colour_name(p.clothing_colour)} top",
    }


class TeacherRendering:
    name = "generate"
    version = VERSION

    def __init__(self, resolution: int, au_names: list[str]):
        unknown = [a for a in au_names if a not in AU_NAMES]
        if unknown:
            raise ValueError(f"prompts.au_names: the teacher renders {list(AU_NAMES)}, not {unknown}")
        self.resolution = resolution
        self.au_names = list(au_names)

    def paint(self, prompts: list[str], seeds: list[int]) -> list[np.ndarray]:
        """Neutral reference faces; the identity comes from the seed, the prompt only describes it."""
        return [render_face(identity_params(s), {}, size=self.resolution).image for s in seeds]

    def run(self, samples: list[SampleRecord], people: dict[int, IdentityRecord]) -> tuple[list[SampleRecord], StageStats]:
        start = time.perf_counter()
        for s in samples:
            params = identity_params(people[s.identity].seed)
            s.image = render_face(params, s.requested, size=self.resolution).image
            s.intensity = {au: float(s.requested[au]) for au in self.au_names}
            s.occurrence_prob = {au: float(s.requested[au] >= 1) for au in self.au_names}
        return samples, StageStats(self.name, self.version, len(samples), len(samples),
                                   seconds=time.perf_counter() - start)
