"""The typed records that stages pass along. One function at the edge (`shards.py`) turns them into bytes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


def sample_key(identity: int, sample: int) -> str:
    """Dot-free key from content identity, never from batch position: 'id0000012-s0003'."""
    return f"id{identity:07d}-s{sample:04d}"


@dataclass
class IdentityRecord:
    """One identity: who it is (stage 1), and its reference face, mask and inpainting canvas (stage 2)."""

    identity: int
    seed: int
    demographics: dict[str, str]
    prompt: str
    reference: np.ndarray | None = None  # uint8 HxWx3 RGB
    mask: np.ndarray | None = None  # uint8 HxW, 255 = region to generate
    canvas: np.ndarray | None = None  # uint8 HxWx3: reference with the mask region black
    source: str = ""  # "generated" or "folder:<file name>"
    embedding: list[float] | None = None  # the reference face's identity embedding (filter stage, when on)


@dataclass
class SampleRecord:
    """One sample as it moves through the stages; later stages fill later fields."""

    identity: int
    sample: int
    seed: int
    expression: str = ""  # "neutral", "random" or an emotion name
    requested: dict[str, int] = field(default_factory=dict)  # AU -> FACS intensity 0..5, over the build's AU set
    prompt: str = ""
    # stage 3: generation
    image: np.ndarray | None = None  # uint8 HxWx3 RGB
    occurrence_prob: dict[str, float] = field(default_factory=dict)
    intensity: dict[str, float] = field(default_factory=dict)
    # stage 4: filtering
    scores: dict[str, Any] = field(default_factory=dict)
    keep: bool = True
    drop_reason: str | None = None
    # the encoded image (format of the writer), filled by the filter stage so the GPU never encodes
    image_bytes: bytes | None = None

    @property
    def key(self) -> str:
        return sample_key(self.identity, self.sample)


@dataclass
class StageStats:
    """What one stage did to one unit: counts in/out, drops by reason, seconds. Summed by the runner."""

    name: str
    version: str
    n_in: int = 0
    n_out: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    def drop(self, reason: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1

    def merge(self, other: "StageStats") -> None:
        self.n_in += other.n_in
        self.n_out += other.n_out
        self.seconds += other.seconds
        for reason, n in other.dropped.items():
            self.dropped[reason] = self.dropped.get(reason, 0) + n

    def to_json(self) -> dict[str, Any]:
        return {"version": self.version, "in": self.n_in, "out": self.n_out,
                "dropped": dict(sorted(self.dropped.items())), "seconds": round(self.seconds, 3)}
