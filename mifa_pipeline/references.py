"""Reference portraits (`identities.source: folder`) checked before a build writes anything.

Every reference a build will use is opened and decoded here, in the driver, so a corrupt, empty, huge or
mis-named file (or a symlink loop) is named before Ray starts or a model loads, not by a worker later.
When the identity judge is on, the face judge must find exactly one face in each (what the identity phase
embeds): a reference without one would make every sample of its identity unjudgeable. Such references are an
error, or with `identities.non_face_references: skip` are passed over for the next image and counted.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from mifa_pipeline.config import BuildManifest, checkpoint_dir
from mifa_pipeline.judging import JudgeSpec
from mifa_pipeline.stages.identities import ReferenceImageError, load_mask, load_square_rgb, mask_file, reference_files

TEACHER_RESOLUTION = 128  # the teacher renderer's default size (`work.TEACHER_RESOLUTION`)
LISTED = 20  # bad files named in one message; the rest are counted


class ReferenceError(ValueError):
    """References that cannot be used; the message names each bad file."""


@dataclass
class References:
    files: list[Path] = field(default_factory=list)  # identity i takes files[i]
    skipped: list[dict[str, str]] = field(default_factory=list)  # {"file", "reason"}: passed over (no single face)


def generation_resolution(manifest: BuildManifest) -> int:
    """The size references are read at (what the workers' generator uses), without loading the model."""
    import json

    if manifest.sampler.resolution:
        return manifest.sampler.resolution
    folder = checkpoint_dir(manifest.model.checkpoint)
    if folder is None:
        return TEACHER_RESOLUTION
    try:
        return int(json.loads((folder / "maugen_config.json").read_text(encoding="utf-8"))["resolution"])
    except (OSError, ValueError, KeyError, TypeError):
        raise ReferenceError(f"model.checkpoint: {folder}/maugen_config.json is missing or names no resolution; "
                             "is it a mifa checkpoint folder?") from None


def check_references(manifest: BuildManifest, judges: dict[str, JudgeSpec]) -> References:
    """The references of a folder build, each proven readable (and holding one face when the identity judge is on)."""
    ids = manifest.identities
    skip = ids.non_face_references == "skip"
    candidates = reference_files(ids.folder)
    if not skip:
        candidates = candidates[: ids.count]  # identity i takes the i-th image: the rest are never read
    size = generation_resolution(manifest)
    counter = None
    if "identity" in judges:
        from mifa_pipeline.judging import Judges

        counter = Judges(manifest.filter, {"face": judges["face"]}, run={"face"})
    result, bad = References(), []
    try:
        for path in candidates:
            if len(result.files) == ids.count:
                break
            try:
                image = load_square_rgb(path, size)
                mask = mask_file(path)
                if mask is not None:
                    load_mask(mask, size)
            except ReferenceImageError as exc:
                bad.append(str(exc))
                continue
            faces = counter.count_faces(image) if counter is not None else 1
            if faces != 1:
                why = "no face found" if faces == 0 else f"{faces} faces found"
                if skip:
                    result.skipped.append({"file": path.name, "reason": why})
                    continue
                bad.append(f"{path}: {why} by the face judge ({judges['face'].kind}); the identity judge needs one "
                           "(or set identities.non_face_references: skip)")
                continue
            result.files.append(path)
    finally:
        if counter is not None:
            counter.close()
    if bad:
        listed = "\n".join(f"  {line}" for line in bad[:LISTED])
        more = f"\n  ... and {len(bad) - LISTED} more" if len(bad) > LISTED else ""
        raise ReferenceError(f"identities.folder: {len(bad)} reference image(s) cannot be used:\n{listed}{more}")
    if len(result.files) < ids.count:
        passed = f" ({len(result.skipped)} skipped: no single face)" if result.skipped else ""
        raise ReferenceError(f"identities.folder: {ids.folder} holds {len(result.files)} usable images{passed}, "
                             f"identities.count needs {ids.count}")
    return result
