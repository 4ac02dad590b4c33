"""The unit pool: every generated sample, kept or dropped, committed per work unit under OUT/_work/units/.

A unit is written into a temporary folder and renamed into place, so after any crash a unit folder is
either complete or absent. The pool is what a resumed build skips and what `mifa filter` re-decides
from without regenerating: it holds the encoded images, the labels, the scores and the identities.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from mifa_pipeline.plan import WorkUnit
from mifa_pipeline.records import IdentityRecord, SampleRecord, StageStats
from mifa_pipeline.shards import encode_image

WORK_DIR = "_work"
TMP_PREFIX = ".tmp-"


def units_dir(out: Path) -> Path:
    return out / WORK_DIR / "units"


def unit_dir(out: Path, unit: WorkUnit) -> Path:
    return units_dir(out) / unit.name


def is_committed(out: Path, unit: WorkUnit) -> bool:
    return (unit_dir(out, unit) / "stats.json").is_file()


def clean_partial(out: Path) -> int:
    """Remove half-written units left by a crash; returns how many."""
    folder = units_dir(out)
    if not folder.is_dir():
        return 0
    partial = [p for p in folder.iterdir() if p.name.startswith(TMP_PREFIX)]
    for p in partial:
        shutil.rmtree(p, ignore_errors=True)
    return len(partial)


def _json(value: Any) -> str:
    """Insertion order is kept (AUs stay in the model's order); it is deterministic by construction."""
    return json.dumps(value, separators=(",", ":"))


def sample_rows(samples: list[SampleRecord], people: dict[int, IdentityRecord], image_ext: str) -> pa.Table:
    return pa.table({
        "key": [s.key for s in samples],
        "identity": pa.array([s.identity for s in samples], pa.int64()),
        "sample": pa.array([s.sample for s in samples], pa.int64()),
        "seed": pa.array([s.seed for s in samples], pa.int64()),
        "expression": [s.expression for s in samples],
        "prompt": [s.prompt for s in samples],
        "demographics": [_json(people[s.identity].demographics) for s in samples],
        "requested": [_json(s.requested) for s in samples],
        "occurrence_prob": [_json(s.occurrence_prob) for s in samples],
        "intensity": [_json(s.intensity) for s in samples],
        "scores": [_json(s.scores) for s in samples],
        "keep": pa.array([s.keep for s in samples], pa.bool_()),
        "drop_reason": pa.array([s.drop_reason for s in samples], pa.string()),
        "image": pa.array([s.image_bytes for s in samples], pa.binary()),
        "image_ext": [image_ext] * len(samples),
    })


def identity_rows(people: list[IdentityRecord]) -> pa.Table:
    return pa.table({
        "identity": pa.array([p.identity for p in people], pa.int64()),
        "seed": pa.array([p.seed for p in people], pa.int64()),
        "prompt": [p.prompt for p in people],
        "demographics": [_json(p.demographics) for p in people],
        "source": [p.source for p in people],
        "reference_png": pa.array([encode_image(p.reference, "png") for p in people], pa.binary()),
        "mask_png": pa.array([encode_image(p.mask, "png") for p in people], pa.binary()),
        "embedding": pa.array([p.embedding for p in people], pa.list_(pa.float32())),
    })


def write_unit(out: Path, unit: WorkUnit, samples: pa.Table, identities: pa.Table, stats: dict[str, Any],
               judges: dict[str, str], source: Path | None = None) -> None:
    """Write a unit folder under a temporary name, fsync, rename: it is whole or absent.

    `judges` are the fingerprints of the judges whose raw scores the samples hold; `source`, for a
    re-filtered version, is the unit folder of the build that holds the images (not copied again).
    """
    final = unit_dir(out, unit)
    tmp = final.with_name(f"{TMP_PREFIX}{unit.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    pq.write_table(samples, tmp / "samples.parquet", compression="zstd")
    pq.write_table(identities, tmp / "identities.parquet", compression="zstd")
    (tmp / "judges.json").write_text(_json(dict(sorted(judges.items()))) + "\n")
    if source is not None:
        (tmp / "source.json").write_text(_json({"unit": str(source)}) + "\n")
    (tmp / "stats.json").write_text(_json(stats) + "\n")  # last: its presence marks the unit committed
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    os.replace(tmp, final)


def commit_unit(out: Path, unit: WorkUnit, people: list[IdentityRecord], samples: list[SampleRecord],
                stats: list[StageStats], image_ext: str, judges: dict[str, str]) -> None:
    by_id = {p.identity: p for p in people}
    write_unit(out, unit, sample_rows(samples, by_id, image_ext), identity_rows(people),
               {s.name: s.to_json() for s in stats}, judges)


def source_dir(out: Path, unit: WorkUnit) -> Path:
    """The unit folder that holds this unit's images and reference faces."""
    folder = unit_dir(out, unit)
    source = folder / "source.json"
    return Path(json.loads(source.read_text())["unit"]) if source.is_file() else folder


def _read(out: Path, unit: WorkUnit, table: str, columns: list[str] | None, media: tuple[str, ...]) -> pa.Table:
    """A unit table, with media columns (images, reference faces) joined from the source unit if elsewhere."""
    folder = unit_dir(out, unit)
    data = pq.read_table(folder / table, columns=columns)
    wanted = [c for c in media if columns is None or c in columns]
    source = source_dir(out, unit)
    if source == folder or not wanted:
        return data
    key = "key" if table == "samples.parquet" else "identity"
    media_table = pq.read_table(source / table, columns=[key, *wanted])
    if media_table.column(key).to_pylist() != data.column(key).to_pylist():
        raise RuntimeError(f"{folder}: rows differ from its source {source}")
    for name in wanted:
        data = data.set_column(data.schema.get_field_index(name), name, media_table.column(name))
    return data


def read_samples(out: Path, unit: WorkUnit, columns: list[str] | None = None) -> list[dict[str, Any]]:
    return _read(out, unit, "samples.parquet", columns, ("image",)).to_pylist()


def read_sample_metadata(out: Path, unit: WorkUnit) -> list[dict[str, Any]]:
    """Every column but the image bytes: what a resume needs for samples whose shards already exist."""
    names = [n for n in pq.read_schema(unit_dir(out, unit) / "samples.parquet").names if n != "image"]
    return read_samples(out, unit, names)


def read_judges(out: Path, unit: WorkUnit) -> dict[str, str]:
    path = unit_dir(out, unit) / "judges.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def read_identities(out: Path, unit: WorkUnit, columns: list[str] | None = None) -> list[dict[str, Any]]:
    return _read(out, unit, "identities.parquet", columns, ("reference_png", "mask_png")).to_pylist()


def read_stats(out: Path, unit: WorkUnit) -> dict[str, dict[str, Any]]:
    return json.loads((unit_dir(out, unit) / "stats.json").read_text())
