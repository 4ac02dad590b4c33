"""`mifa filter`: re-decide an existing data set with other filter settings, into a new version.

Nothing is regenerated. The job is the build's shard machinery with another worker: per shard, a
`RefilterWorker` reads the parent's scores table (every planned sample, kept or dropped), re-decides from
the stored scores (a threshold-only change reads no image and runs no model), re-scores only with judges
whose fingerprint changed, and writes the new shard by copying image members byte for byte from the
parent's tar (kept there) or scores table (dropped there). The parent stays intact; the new version has
its own folder, identity table, shards and run manifest (`parent` names the old one).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import ValidationError

from mifa_pipeline import identity_table
from mifa_pipeline.config import BuildManifest, ManifestError, _format_validation_error, apply_overrides, parse_override
from mifa_pipeline.done import forget, write_done
from mifa_pipeline.executors import WorkerSpec
from mifa_pipeline.judging import JudgeFileError, Judges, judge_specs, raw_keys
from mifa_pipeline.manifest import REFILTER_STAGES, SCHEMA_VERSION, chain_fingerprints, read_run_manifest, stage_configs
from mifa_pipeline.plan import BuildPlan, IdentityBlock, ShardSlots
from mifa_pipeline.records import StageStats
from mifa_pipeline.sample_schema import SAMPLE_SCHEMA_VERSION
from mifa_pipeline.runner import (BuildError, BuildResult, PreparedBuild, Runner, check_output, make_executor,
                                  make_identity_table)
from mifa_pipeline.shards import decode_image, tar_members, tar_segments, write_parquet_atomic
from mifa_pipeline.stages.filter import Filtering, redecide
from mifa_pipeline.stages.generate import model_description
from mifa_pipeline.stages.write import SCORES_SCHEMA, ShardWriting, scores_path
from mifa_pipeline.work import duplicate_stats

METADATA = [n for n in SCORES_SCHEMA.names if n != "image"]


def next_version(version: str) -> str:
    major, minor, _ = (int(p) for p in version.split("."))
    return f"{major}.{minor + 1}.0"


@dataclass
class PreparedRefilter(PreparedBuild):
    parent_dir: Path = Path()
    parent_manifest: dict[str, Any] | None = None
    rescore: tuple[str, ...] = ()  # judges whose fingerprint changed: they run again
    removed: tuple[str, ...] = ()  # judges switched off: their scores are dropped


def _parent_duplicates(parent: Path) -> int:
    table = pq.read_table(parent / identity_table.IDENTITIES_FILE, columns=["duplicate"])
    return sum(table.column("duplicate").to_pylist())


def prepare_refilter(parent: Path, overrides: list[str], out: Path | None = None, version: str | None = None,
                     fresh: bool = False) -> PreparedRefilter:
    """Checks that write nothing: the parent is a finished build, only filter.* changes, judges exist."""
    try:
        parent_manifest = read_run_manifest(parent)
    except FileNotFoundError as exc:
        raise BuildError(str(exc)) from None
    if parent_manifest.get("schema_version") != SCHEMA_VERSION:
        raise BuildError(f"{parent}: a data set of an earlier mifa layout (schema {parent_manifest.get('schema_version')}), "
                         "which this version cannot re-filter; rebuild it")
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
    before = parent_manifest.get("judges", {})
    old = parent_manifest["build_manifest"]["filter"]["identity"]["duplicate_cosine"]
    new = manifest.filter.identity.duplicate_cosine
    if (new is None or (old is not None and new > old)) and _parent_duplicates(parent):
        raise BuildError(f"filter.identity.duplicate_cosine={new}: a re-filter can only tighten it (parent: {old}); "
                         "the identities the parent dropped as duplicates were never generated")
    configs = stage_configs(manifest, "", judges)
    chain = chain_fingerprints(parent_manifest["fingerprint"], configs, REFILTER_STAGES)
    records = [j.record for j in specs.values() if j.record]
    build = PreparedRefilter(manifest, BuildPlan.from_manifest(manifest), records, chain, judges, fresh,
                             parent_dir=parent, parent_manifest=parent_manifest,
                             rescore=tuple(sorted(n for n in judges if before.get(n) != judges[n])),
                             removed=tuple(sorted(set(before) - set(judges))))
    return check_output(build)


class RefilterWorker:
    """Re-decides the parent's shards; loads a judge (once per worker) only when its fingerprint changed."""

    def __init__(self, build: PreparedRefilter, fingerprint: str):
        self.manifest = build.manifest
        self.out = build.out
        self.parent = build.parent_dir
        self.fingerprint = fingerprint
        self.rescore, self.removed = set(build.rescore), set(build.removed)
        # a parent of another sample schema has other .json bytes: its samples are re-written, never copied
        self.copyable = (build.parent_manifest or {}).get("sample_schema") == SAMPLE_SCHEMA_VERSION
        self.judges: Judges | None = None

    def _judges(self) -> Judges:
        if self.judges is None:
            cfg = self.manifest.filter
            self.judges = Judges(cfg, judge_specs(cfg), run=self.rescore)
        return self.judges

    def close(self) -> None:
        if self.judges is not None:
            self.judges.close()

    def reembed_identities(self, block: IdentityBlock) -> dict[str, Any]:
        """The parent's reference faces embedded by a changed identity judge (their duplicates kept)."""
        forget(self.out, block.name)
        rows = identity_table.read_rows(self.parent, block.identities)
        images = {r["identity"]: decode_image(r["reference_png"]) for r in rows}
        embeddings = self._judges().reference_embeddings(images)
        table = pa.Table.from_pylist([{**r, "embedding": embeddings[r["identity"]]} for r in rows],
                                     schema=identity_table.IDENTITY_SCHEMA)
        relative = identity_table.block_path(block.name)
        (self.out / relative).parent.mkdir(parents=True, exist_ok=True)
        write_parquet_atomic(table, self.out / relative)
        return write_done(self.out, block.name, self.fingerprint, [relative], stats={})

    def make_shard(self, shard: ShardSlots) -> dict[str, Any]:
        """Re-decide one shard of the parent from its scores table; kept samples whose scores did not change
        are copied as raw tar bytes with their sidecar rows, so a threshold-only change decodes nothing."""
        forget(self.out, shard.name)
        start = time.perf_counter()
        m, cfg = self.manifest, self.manifest.filter
        scores_file = self.parent / scores_path(shard.name)
        rows = pq.read_table(scores_file, columns=METADATA).to_pylist()
        people = {r["identity"]: r for r in identity_table.read_rows(
            self.out, shard.identities, ["embedding", "nearest_earlier_cosine", "duplicate"])}
        parent_kept = {r["key"] for r in rows if r["keep"]}
        stored: dict[str, bytes] | None = None
        members: dict[str, dict[str, bytes]] | None = None

        def image(row: dict[str, Any]) -> bytes | None:
            """The encoded image, byte for byte: from the parent's tar if it kept it, else its scores table."""
            nonlocal stored, members
            if row["key"] in parent_kept:
                if members is None:
                    members = tar_members(self.parent / f"{shard.name}.tar")
                return members[row["key"]][row["image_ext"]]
            if stored is None:  # dropped images are read only when some are needed
                table = pq.read_table(scores_file, columns=["key", "image"])
                stored = dict(zip(table.column("key").to_pylist(), table.column("image").to_pylist()))
            return stored[row["key"]]

        filt = StageStats(Filtering.name, Filtering.version)
        dup = duplicate_stats(len(rows))
        unchanged: list[str] = []
        for row in rows:
            before = row["scores"]
            raw = json.loads(before)
            raw.pop("identity_nearest_earlier_cosine", None)
            person = people[row["identity"]]
            if "image_valid" not in raw:  # its identity was a duplicate in the parent: never generated, stays dropped
                scores, reason = raw, "duplicate_identity"
                dup.drop(reason)
            else:
                for judge in self.removed | self.rescore:
                    for key in raw_keys(judge, raw):
                        del raw[key]
                if self.rescore and raw.get("image_valid"):
                    raw.update(self._judges().score(decode_image(image(row)), person["embedding"]))
                scores, reason = redecide(raw, json.loads(row["requested"]), json.loads(row["occurrence_prob"]), cfg)
                if person["duplicate"]:
                    reason = "duplicate_identity"
                    dup.drop(reason)
                else:
                    dup.n_out += 1
                    filt.n_in += 1
                    if reason is None:
                        filt.n_out += 1
                    else:
                        filt.drop(reason)
            scores["identity_nearest_earlier_cosine"] = person["nearest_earlier_cosine"]
            after = json.dumps(scores, separators=(",", ":"))
            row.update(scores=after, keep=reason is None, drop_reason=reason, image=None)
            if reason is None and row["key"] in parent_kept and after == before and self.copyable:
                unchanged.append(row["key"])  # same members as in the parent: copied, not rebuilt
            elif reason is None or scores.get("image_valid"):
                row["image"] = image(row)
        filt.seconds = time.perf_counter() - start
        copies = {}
        if unchanged:  # the parent's tar and sidecar are read only when something is copied from them
            segments = tar_segments(self.parent / f"{shard.name}.tar")
            sidecar = {r["key"]: r for r in pq.read_table(self.parent / f"{shard.name}.parquet").to_pylist()}
            copies = {key: (segments[key], sidecar[key]) for key in unchanged}
        writing = ShardWriting(self.out, {"name": m.dataset.name}, model_description(m.model))
        contents, files, write_stats = writing.run(shard.name, rows, copies)
        return write_done(self.out, shard.name, self.fingerprint, files, planned=shard.planned, **contents,
                          stats={s.name: s.to_json() for s in (dup, filt, write_stats)})


class RefilterJob:
    """The re-filter's work: the parent's identity table (re-embedded where that judge changed), then shards."""

    kind = "mifa-filter"
    progress_stages = ("samples", "shards")

    def __init__(self, build: PreparedRefilter):
        self.build = build

    def worker_spec(self, executor) -> WorkerSpec:
        """CPU workers: as many as the cluster holds beside one CPU step (one here, in-process)."""
        share = self.build.manifest.resources.filter_cpus
        count = 1
        if hasattr(executor, "cluster"):
            count = max(1, min(len(self.build.plan.shards), int((executor.cluster().get("CPU", 1.0) - share) / share)))
        return WorkerSpec(RefilterWorker, (self.build, self.build.fingerprint), count, share, 0.0)

    def identity_phase(self, runner: Runner, pool) -> dict[str, Any]:
        """The parent's identity table, re-embedded when the identity judge changed, duplicates re-decided."""
        if "identity" in self.build.rescore:
            return make_identity_table(runner, pool, "reembed_identities")
        return make_identity_table(runner, pool, None, [self.build.parent_dir / identity_table.IDENTITIES_FILE])

    def lineage(self) -> dict[str, Any]:
        parent = self.build.parent_manifest
        return {"kind": self.kind, "parent": {
            "fingerprint": parent["fingerprint"], "path": str(self.build.parent_dir.resolve()),
            "version": parent["dataset"]["version"]}}

    def inherited_stages(self) -> dict[str, dict[str, Any]]:
        return {k: v for k, v in self.build.parent_manifest["stages"].items() if k in ("prompts", "identities", "generate")}

    def annotate(self, content: dict[str, Any]) -> None:
        content["stages"].setdefault(Filtering.name, StageStats(Filtering.name, Filtering.version).to_json())
        content["stages"][Filtering.name]["rescored_judges"] = list(self.build.rescore)


def run_refilter(build: PreparedRefilter, kind: str = "local", progress: bool | None = None,
                 ray_address: str | None = None) -> BuildResult:
    """Run a prepared re-filter on the executor `kind` ('local' or 'ray')."""
    executor = make_executor(kind, build.manifest, ray_address, check=False)
    return Runner(build, executor, RefilterJob(build), progress=progress).run()
