"""`mifa filter`: re-decide an existing data set with other filter settings, into a new version.

Nothing is regenerated. Per work unit, the stored raw scores are reused; only judges whose fingerprint
changed (another model file, detector or AU set) run again, and a threshold-only change runs no model at
all. The new version gets its own folder, shards and run manifest (with the old one as parent); its unit
folders hold the new scores and decisions and point at the build's units for the images, so the old
version stays intact and readable. Resume, Ray, progress and `mifa verify` work as for a build.
"""

from __future__ import annotations

import io
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from pydantic import ValidationError

from mifa_pipeline import pool
from mifa_pipeline.config import BuildManifest, ManifestError, _format_validation_error, apply_overrides, parse_override
from mifa_pipeline.judging import JudgeFileError, Judges, judge_specs, raw_keys
from mifa_pipeline.manifest import STAGES, chain_fingerprints, read_run_manifest, stage_configs
from mifa_pipeline.plan import BuildPlan, WorkUnit
from mifa_pipeline.records import StageStats
from mifa_pipeline.runner import BuildError, BuildRunner, LocalRunner, PreparedBuild, _check_output
from mifa_pipeline.stages.filter import Filtering, redecide
from mifa_pipeline.stages.write import ShardWriting

REFILTER_STAGES = tuple(s for s in STAGES if s.name in (Filtering.name, ShardWriting.name))


def next_version(version: str) -> str:
    major, minor, _ = (int(p) for p in version.split("."))
    return f"{major}.{minor + 1}.0"


@dataclass
class PreparedRefilter(PreparedBuild):
    parent_dir: Path = Path()
    parent_manifest: dict[str, Any] | None = None


def prepare_refilter(parent: Path, overrides: list[str], out: Path | None = None, version: str | None = None,
                     fresh: bool = False) -> PreparedRefilter:
    """Checks that write nothing: the parent is a finished build, only filter.* changes, judges exist."""
    try:
        parent_manifest = read_run_manifest(parent)
    except FileNotFoundError as exc:
        raise BuildError(str(exc)) from None
    for text in overrides:
        try:
            parts, _ = parse_override(text)
        except ManifestError as exc:
            raise BuildError(str(exc)) from None
        if parts[0] != "filter":
            raise BuildError(f"--set {text}: mifa filter changes only filter.* settings; "
                             "anything else needs a new `mifa build`")
    data = apply_overrides(json.loads(json.dumps(parent_manifest["build_manifest"])), overrides)
    data["dataset"]["version"] = version or next_version(parent_manifest["dataset"]["version"])
    data["output"] = str(out) if out is not None else str(parent.parent / f"{parent.name}-v{data['dataset']['version']}")
    try:
        manifest = BuildManifest.model_validate(data)
    except ValidationError as exc:
        raise BuildError(_format_validation_error(exc, "mifa filter")) from None
    if manifest.output.resolve() == parent.resolve():
        raise BuildError(f"--out {manifest.output}: a new version needs its own folder; the parent stays intact")
    try:
        specs = judge_specs(manifest.filter)
    except JudgeFileError as exc:
        raise BuildError(str(exc)) from None
    judges = {n: j.fingerprint for n, j in specs.items()}
    configs = stage_configs(manifest, "", judges)
    chain = chain_fingerprints(parent_manifest["fingerprint"], configs, REFILTER_STAGES)
    records = [j.record for j in specs.values() if j.record]
    build = PreparedRefilter(manifest, BuildPlan.from_manifest(manifest), records, chain, judges, fresh,
                             parent_dir=parent, parent_manifest=parent_manifest)
    return _check_output(build)


@dataclass
class RefilteredUnit:
    unit: WorkUnit
    samples: pa.Table
    identities: pa.Table
    stats: StageStats
    rescored: list[str]
    source: Path


def _decode(png: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(png)) as img:
        return np.asarray(img.convert("RGB"), dtype=np.uint8).copy()


def refilter_unit(manifest: BuildManifest, parent: Path, unit: WorkUnit) -> RefilteredUnit:
    """Re-score (only changed judges) and re-decide one unit of the parent; loads no model if none changed."""
    start = time.perf_counter()
    cfg = manifest.filter
    specs = judge_specs(cfg)
    before = pool.read_judges(parent, unit)
    rerun = {n for n, spec in specs.items() if before.get(n) != spec.fingerprint}
    removed = set(before) - set(specs)
    stats = StageStats(Filtering.name, Filtering.version)
    samples = pool.read_samples(parent, unit)
    people = pool.read_identities(parent, unit)
    judges = Judges(cfg, specs, run=rerun) if rerun else None
    try:
        embeddings = {p["identity"]: p["embedding"] for p in people}
        if "identity" in removed:
            embeddings = {i: None for i in embeddings}
        if judges is not None and "identity" in judges.run:
            embeddings = judges.reference_embeddings({p["identity"]: _decode(p["reference_png"]) for p in people})
        for row in samples:
            raw = json.loads(row["scores"])
            for judge in removed | rerun:
                for key in raw_keys(judge, raw):
                    del raw[key]
            if judges is not None and raw.get("image_valid"):
                raw.update(judges.score(_decode(row["image"]), embeddings[row["identity"]]))
            scores, reason = redecide(raw, json.loads(row["requested"]), json.loads(row["occurrence_prob"]), cfg)
            row.update(scores=json.dumps(scores, separators=(",", ":")), keep=reason is None, drop_reason=reason,
                       image=None)
            stats.n_in += 1
            if reason is None:
                stats.n_out += 1
            else:
                stats.drop(reason)
    finally:
        if judges is not None:
            judges.close()
    for p in people:
        p.update(embedding=embeddings[p["identity"]], reference_png=None, mask_png=None)
    stats.seconds = time.perf_counter() - start
    schema = pq.read_schema(pool.unit_dir(parent, unit) / "samples.parquet")
    id_schema = pq.read_schema(pool.unit_dir(parent, unit) / "identities.parquet")
    return RefilteredUnit(unit, pa.Table.from_pylist(samples, schema=schema), pa.Table.from_pylist(people, schema=id_schema),
                          stats, sorted(rerun), pool.source_dir(parent, unit))


class RefilterMixin:
    """Turns a runner (local or Ray) into a re-filter: units come from the parent, not from generation."""

    build: PreparedRefilter
    progress_stages = ("filter", "write")

    def execute(self, units: list[WorkUnit]):
        for result in self.map_units(refilter_unit, units, self.manifest, self.build.parent_dir):
            self.advance("filter", result.stats.n_in)
            yield result

    def commit(self, result: RefilteredUnit) -> None:
        stats = {result.stats.name: result.stats.to_json()}
        stats[result.stats.name]["rescored"] = result.rescored
        pool.write_unit(self.out, result.unit, result.samples, result.identities, stats, self.build.judges,
                        source=result.source)

    def lineage(self) -> dict[str, Any]:
        parent = self.build.parent_manifest
        return {"kind": "mifa-filter", "parent": {
            "fingerprint": parent["fingerprint"], "path": str(self.build.parent_dir.resolve()),
            "version": parent["dataset"]["version"]}}

    def _stage_totals(self, writer_stats: StageStats) -> dict[str, dict[str, Any]]:
        inherited = {k: v for k, v in self.build.parent_manifest["stages"].items()
                     if k in ("prompts", "identities", "generate")}
        rescored: set[str] = set()
        for unit in self.build.plan.units:
            rescored |= set(pool.read_stats(self.out, unit)["filter"].get("rescored", []))
        totals = {**inherited, **super()._stage_totals(writer_stats)}
        totals["filter"]["rescored_judges"] = sorted(rescored)
        return totals


class LocalRefilterRunner(RefilterMixin, LocalRunner):
    pass


def make_runner(kind: str, build: PreparedRefilter, progress: bool | None, ray_address: str | None) -> BuildRunner:
    if kind == "local":
        return LocalRefilterRunner(build, progress=progress)
    from mifa_pipeline.ray_runner import RayRefilterRunner

    return RayRefilterRunner(build, progress=progress, ray_address=ray_address)

