"""Stage 2, identity sampling: a reference face per identity, its face mask and the inpainting canvas.

The reference comes either from a user's folder of portraits (sorted by file name; identity i takes the
i-th image) or is painted by the generator from the identity prompt (a callable injected by the runner,
so this stage knows no model). The mask marks the face and head to regenerate: `<stem>_mask.png` beside
a folder image when present, else an ellipse from the manifest. The canvas is the reference with the mask
region black, the inpainting input MAUGen was trained with.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from mifa_pipeline.config import EllipseMask, IdentitySection
from mifa_pipeline.records import IdentityRecord, StageStats

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
MASK_SUFFIX = "_mask"

# painter(prompts, seeds) -> one uint8 HxWx3 RGB image per prompt
Painter = Callable[[list[str], list[int]], list[np.ndarray]]


def reference_files(folder: Path) -> list[Path]:
    """Portraits in a folder, sorted by name; `*_mask.png` files are masks, not portraits."""
    return sorted(
        p for p in folder.iterdir()
        if p.suffix.lower() in IMAGE_SUFFIXES and not p.stem.endswith(MASK_SUFFIX) and not p.name.startswith(".")
    )


def ellipse_mask(size: int, ellipse: EllipseMask) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    inside = ((xx / size - ellipse.center_x) / ellipse.radius_x) ** 2 + ((yy / size - ellipse.center_y) / ellipse.radius_y) ** 2 <= 1.0
    return np.where(inside, 255, 0).astype(np.uint8)


def _center_square(img: Image.Image, size: int, resample: Image.Resampling) -> Image.Image:
    """Centre-crop to a square (never squash a face) and resize."""
    side = min(img.size)
    left, top = (img.width - side) // 2, (img.height - side) // 2
    return img.crop((left, top, left + side, top + side)).resize((size, size), resample)


def load_square_rgb(path: Path, size: int) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(_center_square(img.convert("RGB"), size, Image.Resampling.LANCZOS), dtype=np.uint8).copy()


def load_mask(path: Path, size: int) -> np.ndarray:
    with Image.open(path) as img:
        square = _center_square(img.convert("L"), size, Image.Resampling.NEAREST)
        return np.where(np.asarray(square) >= 128, 255, 0).astype(np.uint8)


def make_canvas(reference: np.ndarray, mask: np.ndarray) -> np.ndarray:
    canvas = reference.copy()
    canvas[mask > 0] = 0
    return canvas


class IdentitySampling:
    name = "identities"
    version = "1"

    def __init__(self, config: IdentitySection, resolution: int, painter: Painter | None = None):
        self.config = config
        self.resolution = resolution
        self.painter = painter
        self._files = reference_files(config.folder) if config.source == "folder" else []
        if config.source == "folder" and len(self._files) < config.count:
            raise ValueError(
                f"identities.folder {config.folder} holds {len(self._files)} reference images, "
                f"but identities.count is {config.count}"
            )
        if config.source != "folder" and painter is None:
            raise ValueError(f"identities.source is {config.source!r} but no painter was given")

    def run(self, people: list[IdentityRecord]) -> tuple[list[IdentityRecord], StageStats]:
        start = time.perf_counter()
        size = self.resolution
        if self.config.source == "folder":
            for person in people:
                path = self._files[person.identity]
                person.reference = load_square_rgb(path, size)
                mask_path = path.with_name(path.stem + MASK_SUFFIX + ".png")
                person.mask = load_mask(mask_path, size) if mask_path.exists() else ellipse_mask(size, self.config.mask)
                person.source = f"folder:{path.name}"
        else:
            images = self.painter([p.prompt for p in people], [p.seed for p in people])
            for person, image in zip(people, images, strict=True):
                person.reference = image
                person.mask = ellipse_mask(size, self.config.mask)
                person.source = "generated" if self.config.source == "generate" else self.config.source
        for person in people:
            person.canvas = make_canvas(person.reference, person.mask)
        stats = StageStats(self.name, self.version, n_in=len(people), n_out=len(people),
                           seconds=time.perf_counter() - start)
        return people, stats
