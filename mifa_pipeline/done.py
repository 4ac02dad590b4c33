"""Done records: the proof that a task's files are whole and belong to this build.

A task (an identity block, the identity table, a shard) writes its files atomically, then a small JSON
record under `_work/done/NAME.json` with the sha256, md5 and size of each file and the build's
fingerprint. A resume adopts a task only when its record names this build and every file still hashes
to what the record says; anything else (missing, truncated, flipped, another build's) is redone, that
task alone. The record is what a worker returns to the driver: a few hundred bytes, never image bytes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mifa_pipeline.shards import atomic_write_text, file_digests

WORK_DIR = "_work"
DONE_DIR = f"{WORK_DIR}/done"


def done_path(out: Path, name: str) -> Path:
    return out / DONE_DIR / f"{name}.json"


def file_entry(out: Path, relative: str) -> dict[str, Any]:
    sha, md5, size = file_digests(out / relative)
    return {"sha256": sha, "md5": md5, "bytes": size}


def write_done(out: Path, name: str, fingerprint: str, files: list[str], **extra: Any) -> dict[str, Any]:
    """Hash `files` (paths relative to `out`) and record them; the record is written last, atomically."""
    record = {"name": name, "fingerprint": fingerprint, "files": {f: file_entry(out, f) for f in files}, **extra}
    path = done_path(out, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(record, indent=1) + "\n")
    return record


def any_done(out: Path) -> bool:
    """Whether some task of the build in `out` has finished (so a failure keeps something to resume from)."""
    folder = out / DONE_DIR
    return folder.is_dir() and any(folder.iterdir())


def file_mismatch(out: Path, relative: str, want: dict[str, Any]) -> str | None:
    """Why `out/relative` is not the file `want` ({sha256, md5, bytes}) describes, or None when it is."""
    path = out / relative
    if not path.is_file():
        return f"{relative}: missing"
    size = path.stat().st_size
    if size != want.get("bytes"):
        return f"{relative}: {size} bytes, recorded {want.get('bytes')} (truncated or changed)"
    sha, md5, _ = file_digests(path)
    if sha != want.get("sha256"):
        return f"{relative}: sha256 {sha[:12]} != recorded {str(want.get('sha256'))[:12]} (changed or damaged)"
    if md5 != want.get("md5"):
        return f"{relative}: md5 {md5} != recorded {want.get('md5')}"
    return None


def read_done(out: Path, name: str) -> tuple[dict[str, Any] | None, str]:
    """(record, "") or (None, why not): the record alone, files unchecked."""
    path = done_path(out, name)
    if not path.is_file():
        return None, "not done yet"
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        files = record["files"]
        if not isinstance(files, dict) or record["name"] != name:
            raise ValueError
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        return None, f"its done record {path.name} is unreadable"
    return record, ""


def check_done(out: Path, name: str, fingerprint: str) -> tuple[dict[str, Any] | None, str]:
    """(record, "") when every file of task `name` is proven whole and of this build, else (None, reason)."""
    record, why = read_done(out, name)
    if record is None:
        return None, why
    if record.get("fingerprint") != fingerprint:
        return None, f"made by another build (fingerprint {str(record.get('fingerprint'))[:12]})"
    for relative, want in record["files"].items():
        why = file_mismatch(out, relative, want)
        if why is not None:
            return None, why
    return record, ""


def forget(out: Path, name: str) -> None:
    """Remove a task's record (before redoing it), so a half-redone task is never taken as done."""
    done_path(out, name).unlink(missing_ok=True)
