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


def commit_unit(out: Path, unit: WorkUnit, people: list[IdentityRecord], samples: list[SampleRecord],
                stats: list[StageStats], image_ext: str) -> None:
    final = unit_dir(out, unit)
    tmp = final.with_name(f"{TMP_PREFIX}{unit.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    by_id = {p.identity: p for p in people}
    pq.write_table(sample_rows(samples, by_id, image_ext), tmp / "samples.parquet", compression="zstd")
    pq.write_table(identity_rows(people), tmp / "identities.parquet", compression="zstd")
    (tmp / "stats.json").write_text(_json({s.name: s.to_json() for s in stats}) + "\n")
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    os.replace(tmp, final)


def read_samples(out: Path, unit: WorkUnit, columns: list[str] | None = None) -> list[dict[str, Any]]:
    return pq.read_table(unit_dir(out, unit) / "samples.parquet", columns=columns).to_pylist()


def read_identities(out: Path, unit: WorkUnit, columns: list[str] | None = None) -> list[dict[str, Any]]:
    return pq.read_table(unit_dir(out, unit) / "identities.parquet", columns=columns).to_pylist()


def read_stats(out: Path, unit: WorkUnit) -> dict[str, dict[str, Any]]:
    return json.loads((unit_dir(out, unit) / "stats.json").read_text())
