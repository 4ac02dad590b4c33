"""Done records: the proof that a task's files are whole and belong to this build.

A task (an identity block, the identity table, a shard) writes its files atomically, then a small JSON
record under `_work/done/NAME.json` with the sha256, md5 and size of each file and the build's
fingerprint. A resume adopts a task only when its record names this build and every file still hashes
to what the record says; anything else (missing, truncated, flipped, another build's) is redone, that
task alone. The record is what a worker returns to the driver: a few hundred bytes, never image bytes.
"""

from __future__ import annotations

import json
from typing import Any

from mifa_pipeline.storage import Location, new_hash

WORK_DIR = "_work"
DONE_DIR = f"{WORK_DIR}/done"


class CommitConflict(RuntimeError):
    """Another writer committed the same task with different files (two builds on one output?)."""


def done_path(name: str) -> str:
    return f"{DONE_DIR}/{name}.json"


def proof_of(want: dict[str, Any]) -> str:
    """The digest that proves a file is the one `want` describes: its BLAKE3 (cryptographic like sha256, 2.6x
    faster), or its sha256 in an entry written before mifa recorded BLAKE3. Bytes with the recorded digest are
    the recorded bytes, so the entry's other digests (sha256, md5) stand for them without hashing them again."""
    return "blake3" if want.get("blake3") else "sha256"


def write_done(out: Location, name: str, fingerprint: str, files: list[str] | dict[str, dict[str, Any]],
               **extra: Any) -> dict[str, Any]:
    """Record `files` (names relative to `out`): hashed here when given as names, taken as they are when given
    with their entries (what a writer returned for the bytes it wrote, or a parent's published entry for bytes
    `read_verified` or `copy_verified` proved), so nothing is read again. The record is created last and exclusively
    (`Location.create`: link(2) on a disk, `If-None-Match: *` on S3), so no second writer commits the same
    task: one that finds the record there already accepts it only when it names the very same files."""
    entries = files if isinstance(files, dict) else {f: out.digests(f) for f in files}
    record = {"name": name, "fingerprint": fingerprint, "files": entries, **extra}
    data = (json.dumps(record, indent=1) + "\n").encode("utf-8")
    if not out.create(done_path(name), data):
        there, _ = read_done(out, name)
        if there is None or (there["fingerprint"], there["files"]) != (fingerprint, record["files"]):
            raise CommitConflict(f"{name}: another writer committed it first with other files; "
                                 "is a second build writing to this output?")
        return there
    return record


def any_done(out: Location) -> bool:
    """Whether some task of the build in `out` has finished (so a failure keeps something to resume from)."""
    return bool(out.listdir(DONE_DIR))


def done_names(out: Location) -> set[str]:
    """The tasks that have a done record (read or not)."""
    return {n.removesuffix(".json") for n in out.listdir(DONE_DIR) if n.endswith(".json")}


def file_mismatch(out: Location, relative: str, want: dict[str, Any], every_digest: bool = False) -> str | None:
    """Why `out/relative` is not the file `want` ({sha256, md5, bytes, blake3}) describes, or None when it is:
    proven by `proof_of(want)` alone (a resume), or with `every_digest` by each digest it records (`verify`:
    a stale sha256 or md5 beside a right BLAKE3 is told too)."""
    if not out.isfile(relative):
        return f"{relative}: missing"
    size = out.size(relative)
    if size != want.get("bytes"):  # (a truncated file is told without reading it)
        return f"{relative}: {size} bytes, recorded {want.get('bytes')} (truncated or changed)"
    if every_digest:
        return digests_mismatch(relative, out.digests(relative), want)
    algorithm = proof_of(want)
    digest, size = out.digest(relative, algorithm)
    return _differs(relative, algorithm, digest, size, want)


def digests_mismatch(relative: str, got: dict[str, Any], want: dict[str, Any]) -> str | None:
    """Why a file whose entry is `got` (`Location.digests`) is not the one `want` describes, by each digest
    `want` records (sha256 and md5 always; BLAKE3 since mifa records it), or None when it is."""
    for algorithm in ("sha256", "md5", "blake3") if "blake3" in want else ("sha256", "md5"):
        why = _differs(relative, algorithm, got[algorithm], got["bytes"], want)
        if why is not None:
            return why
    return None


def _differs(relative: str, algorithm: str, digest: str, size: int, want: dict[str, Any]) -> str | None:
    if size != want.get("bytes"):
        return f"{relative}: {size} bytes, recorded {want.get('bytes')} (truncated or changed)"
    if digest != want.get(algorithm):
        return f"{relative}: {algorithm} {digest[:12]} != recorded {str(want.get(algorithm))[:12]} (changed or damaged)"
    return None


class DamagedSource(RuntimeError):
    """A file copied from another data set is not the file that data set recorded."""


def read_verified(source: Location, relative: str, want: dict[str, Any]) -> bytes:
    """The bytes of `source`'s file `relative`, read once and proven (`proof_of`) to be the file `want` (its
    published entry) describes, so that `want` is their entry as it stands and they need no hashing again."""
    data = source.read_bytes(relative)
    algorithm = proof_of(want)
    h = new_hash(algorithm)
    h.update(data)
    _prove(source, relative, want, algorithm, h.hexdigest(), len(data))
    return data


def copy_verified(source: Location, relative: str, want: dict[str, Any], out: Location) -> dict[str, Any]:
    """`source`'s file `relative` copied to `out` under the same name, committed only when the bytes written
    are the ones `want` describes (as `read_verified` proves them), streamed, never whole in memory; returns
    their done-record entry."""
    algorithm = proof_of(want)
    out.copy_from(source, relative, algorithm,
                  lambda digest, size: _prove(source, relative, want, algorithm, digest, size))
    return entry_of(want)


def _prove(source: Location, relative: str, want: dict[str, Any], algorithm: str, digest: str, size: int) -> None:
    if size != want.get("bytes") or digest != want.get(algorithm):
        raise DamagedSource(f"{source.full_url(relative)}: {size} bytes, {algorithm} {digest[:12]}; its data set "
                            f"recorded {want.get('bytes')} bytes, {algorithm} {str(want.get(algorithm))[:12]} (changed "
                            f"or damaged since it was built; `mifa verify {source.url}` lists what else is)")


def entry_of(want: dict[str, Any]) -> dict[str, Any]:
    """A done-record entry from a published one (which may carry more keys, such as its path)."""
    return {k: want[k] for k in ("sha256", "md5", "bytes", "blake3") if k in want}


def read_done(out: Location, name: str) -> tuple[dict[str, Any] | None, str]:
    """(record, "") or (None, why not): the record alone, files unchecked."""
    path = done_path(name)
    try:
        text = out.read_text(path)
    except FileNotFoundError:
        return None, "not done yet"
    try:
        record = json.loads(text)
        files = record["files"]
        if not isinstance(files, dict) or record["name"] != name:
            raise ValueError
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        return None, f"its done record {name}.json is unreadable"
    return record, ""


def check_done(out: Location, name: str, fingerprint: str) -> tuple[dict[str, Any] | None, str]:
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


def forget(out: Location, name: str) -> None:
    """Remove a task's record (before redoing it), so a half-redone task is never taken as done."""
    out.remove(done_path(name))
