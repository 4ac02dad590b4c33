"""Stage 2, identity sampling: a reference face per identity, its face mask and the inpainting canvas.

The reference comes either from a user's folder of portraits (sorted by file name; identity i takes the
i-th image) or is painted by the generator from the identity prompt (a callable injected by the runner,
so this stage knows no model). The mask marks the face and head to regenerate: `<stem>_mask.png` beside
a folder image when present, else an ellipse from the manifest. The canvas is the reference with the mask
region black, the inpainting input MAUGen was trained with.
"""

from __future__ import annotations

import os
import stat
import time
import warnings
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from mifa_pipeline.config import EllipseMask, IdentitySection
from mifa_pipeline.records import IdentityRecord, StageStats

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP")
MASK_SUFFIX = "_mask"
MAX_REFERENCE_BYTES = 64 * 1024 * 1024  # a portrait is a few MB
MAX_REFERENCE_PIXELS = 40_000_000  # 40 megapixels: decoding more is a decompression bomb, not a portrait


class ReferenceImageError(ValueError):
    """A reference (or mask) file that cannot be used; the message names the file and why."""

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


@contextmanager
def open_image(path: Path):
    """A decoded PNG/JPEG/WebP from a regular, non-empty file of bounded size and pixel count; anything else
    (a symlink loop, a FIFO, 0 bytes, text named .jpg, a truncated file, a decompression bomb) raises
    ReferenceImageError naming the file, before any large allocation."""
    try:
        info = os.stat(path)
    except OSError as exc:
        raise ReferenceImageError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    if not stat.S_ISREG(info.st_mode):
        raise ReferenceImageError(f"{path}: not a regular file")
    if info.st_size == 0:
        raise ReferenceImageError(f"{path}: empty file (0 bytes)")
    if info.st_size > MAX_REFERENCE_BYTES:
        raise ReferenceImageError(f"{path}: {info.st_size} bytes, more than {MAX_REFERENCE_BYTES // 2**20} MiB")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path, formats=IMAGE_FORMATS) as img:
                width, height = img.size
                if width * height > MAX_REFERENCE_PIXELS:
                    raise ReferenceImageError(f"{path}: too many pixels, more than {MAX_REFERENCE_PIXELS:,} (a "
                                              f"decompression bomb?): {width}x{height}; use a smaller image")
                img.load()  # decode it all now: a truncated or corrupt file fails here, with its name
                yield img
    except ReferenceImageError:
        raise
    except UnidentifiedImageError:
        raise ReferenceImageError(f"{path}: not a PNG, JPEG or WebP image") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ReferenceImageError(f"{path}: too many pixels, more than {MAX_REFERENCE_PIXELS:,} (a decompression bomb?): "
                                  f"{str(exc)[:120]}") from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise ReferenceImageError(f"{path}: cannot decode it ({type(exc).__name__}: {str(exc)[:120]})") from None


def load_square_rgb(path: Path, size: int) -> np.ndarray:
    with open_image(path) as img:
        return np.asarray(_center_square(img.convert("RGB"), size, Image.Resampling.LANCZOS), dtype=np.uint8).copy()


def load_mask(path: Path, size: int) -> np.ndarray:
    with open_image(path) as img:
        square = _center_square(img.convert("L"), size, Image.Resampling.NEAREST)
        return np.where(np.asarray(square) >= 128, 255, 0).astype(np.uint8)


def mask_file(reference: Path) -> Path | None:
    """The `<stem>_mask.png` beside a reference, if there is one (a broken link counts: it is reported)."""
    path = reference.with_name(reference.stem + MASK_SUFFIX + ".png")
    return path if os.path.lexists(path) else None


def make_canvas(reference: np.ndarray, mask: np.ndarray) -> np.ndarray:
    canvas = reference.copy()
    canvas[mask > 0] = 0
    return canvas


class IdentitySampling:
    name = "identities"
    version = "1"

    def __init__(self, config: IdentitySection, resolution: int, painter: Painter | None = None,
                 files: list[Path] | None = None):
        """`files`: the references identity i takes (i-th), as checked before the build (non-face ones skipped);
        default: the folder's images in name order."""
        self.config = config
        self.resolution = resolution
        self.painter = painter
        self._files = [] if config.source != "folder" else reference_files(config.folder) if files is None else files
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
                mask_path = mask_file(path)
                person.mask = load_mask(mask_path, size) if mask_path else ellipse_mask(size, self.config.mask)
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
