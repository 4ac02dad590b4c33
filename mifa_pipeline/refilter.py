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
import threading
import time
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
from pydantic import ValidationError

from mifa_pipeline import identity_table
from mifa_pipeline.config import BuildManifest, ManifestError, _format_validation_error, apply_overrides, parse_override
from mifa_pipeline.done import copy_verified, entry_of, forget, read_verified, write_done
from mifa_pipeline.executors import WorkerSpec
from mifa_pipeline.judging import JudgeFileError, Judges, judge_specs, raw_keys
from mifa_pipeline.manifest import (REFILTER_STAGES, SCHEMA_VERSION, chain_fingerprints, filter_config, read_run_manifest,
                                    stage_configs)
from mifa_pipeline.plan import BuildPlan, IdentityBlock, ShardSlots
from mifa_pipeline.records import StageStats
from mifa_pipeline.sample_schema import SAMPLE_SCHEMA_VERSION
from mifa_pipeline.runner import (IDENTITIES_TASK, BuildError, BuildResult, PreparedBuild, Runner, check_output,
                                  check_thresholds, make_executor, make_identity_table)
from mifa_pipeline.shards import decode_image, tar_members, tar_segments
from mifa_pipeline.stages.filter import Filtering, decide, redecide
from mifa_pipeline.stages.generate import model_description
from mifa_pipeline.stages.write import (SCORES_SCHEMA, ShardWriting, compact_json, parse_json, scores_path,
                                         shard_files)
from mifa_pipeline.storage import Location, StorageError, location, parquet_from_bytes
from mifa_pipeline.work import duplicate_stats

METADATA = [n for n in SCORES_SCHEMA.names if n != "image"]
DECISION = ["key", "scores", "keep", "drop_reason"]  # what a decision from stored scores alone reads


def next_version(version: str) -> str:
    major, minor, _ = (int(p) for p in version.split("."))
    return f"{major}.{minor + 1}.0"


@dataclass
class PreparedRefilter(PreparedBuild):
    parent_dir: Location | None = None
    parent_manifest: dict[str, Any] | None = None
    rescore: tuple[str, ...] = ()  # judges whose fingerprint changed: they run again
    removed: tuple[str, ...] = ()  # judges switched off: their scores are dropped
    note: str = ""  # what the user should know before it runs (e.g. the version taken instead of the default)


def _parent_duplicates(parent: Location) -> int:
    table = parent.read_parquet(identity_table.IDENTITIES_FILE, columns=["duplicate"])
    return sum(table.column("duplicate").to_pylist())


def _label(data: dict[str, Any], key: str) -> tuple[str, str] | None:
    try:
        ds = data[key]["dataset"] if key else data["dataset"]
        return ds["name"], ds["version"]
    except (KeyError, TypeError):
        return None


def labels_in_use(folders: list[Location], parent: dict[str, Any]) -> dict[tuple[str, str], list[tuple[Location, str]]]:
    """(name, version) -> [(location, fingerprint)] of the data sets (finished or under way) in `folders`'
    subfolders, and of the parent's ancestors: the labels a new version must not take again."""
    found: dict[tuple[str, str], list[tuple[Location, str]]] = {}
    record, seen = parent.get("parent"), set()
    options = folders[0].storage_options if folders else {}
    while record and record["fingerprint"] not in seen:  # ancestors may live elsewhere; their manifests name them
        seen.add(record["fingerprint"])
        try:
            where = location(record["path"], options)
            found.setdefault((parent["dataset"]["name"], record["version"]), []).append((where, record["fingerprint"]))
            record = read_run_manifest(where).get("parent")
        except (OSError, ValueError):
            record = None
    for folder in dict.fromkeys(folders):
        for child in folder.subfolders():
            for file, key in (("manifest.json", ""), ("_work/build.json", "build_manifest")):
                try:
                    data = json.loads(child.read_text(file))
                except (OSError, ValueError):
                    continue
                label = _label(data, key)
                if label is not None and "fingerprint" in data:
                    found.setdefault(label, []).append((child, data["fingerprint"]))
                break
    return found


def prepare_refilter(parent: "Location | str", overrides: list[str], out: str | None = None,
                     version: str | None = None, fresh: bool = False, allow_empty: bool = False) -> PreparedRefilter:
    """Checks that write nothing: the parent is a finished build, a filter.* setting changes, thresholds some
    sample can pass (unless `allow_empty`), judges exist,
    and the new version's label (name + version) is one no other data set here or up the lineage carries.
    The new version is written beside the parent (or to `out`), with the parent's storage options."""
    try:
        parent = location(parent)
        parent_manifest = read_run_manifest(parent)
    except (StorageError, FileNotFoundError) as exc:
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

    def manifest_for(v: str) -> BuildManifest:
        data["dataset"]["version"] = v
        data["output"] = str(out) if out is not None else parent.sibling(f"{parent.name}-v{v}").url
        data["storage_options"] = parent.storage_options
        try:
            return BuildManifest.model_validate(data)
        except ValidationError as exc:
            raise BuildError(_format_validation_error(exc, "mifa filter")) from None

    manifest = manifest_for(version or next_version(parent_manifest["dataset"]["version"]))
    check_thresholds(manifest, allow_empty)
    if location(manifest.output, parent.storage_options) == parent:
        raise BuildError(f"--out {manifest.output}: a new version needs its own folder; the parent stays intact")
    try:
        specs = judge_specs(manifest.filter)
    except JudgeFileError as exc:
        raise BuildError(str(exc)) from None
    judges = {n: j.fingerprint for n, j in specs.items()}
    before = parent_manifest.get("judges", {})
    parent_filter = filter_config(BuildManifest.model_validate(parent_manifest["build_manifest"]))
    parent_stage = next((s["version"] for s in parent_manifest.get("stage_fingerprints", []) if s["stage"] == "filter"), None)
    if filter_config(manifest) == parent_filter and judges == before and parent_stage == Filtering.version:
        raise BuildError(f"{parent}: no filter setting changes (overrides: {' '.join(overrides) or 'none'}); the new "
                         "version would hold the same samples; change one with --set filter.KEY=VALUE")
    old = parent_manifest["build_manifest"]["filter"]["identity"]["duplicate_cosine"]
    new = manifest.filter.identity.duplicate_cosine
    if (new is None or (old is not None and new > old)) and _parent_duplicates(parent):
        raise BuildError(f"filter.identity.duplicate_cosine={new}: a re-filter can only tighten it (parent: {old}); "
                         "the identities the parent dropped as duplicates were never generated")
    records = [j.record for j in specs.values() if j.record]
    try:
        taken = labels_in_use([parent.parent(), *([location(out, parent.storage_options).parent()] if out else [])],
                              parent_manifest)
    except StorageError as exc:
        raise BuildError(str(exc)) from None

    def candidate(m: BuildManifest) -> tuple[PreparedRefilter, Location | None]:
        """The prepared version for manifest `m`, and the folder that already carries its label (if any)."""
        chain = chain_fingerprints(parent_manifest["fingerprint"], stage_configs(m, "", judges), REFILTER_STAGES)
        build = PreparedRefilter(m, BuildPlan.from_manifest(m), records, chain, judges, fresh,
                                 parent_dir=parent, parent_manifest=parent_manifest,
                                 rescore=tuple(sorted(n for n in judges if before.get(n) != judges[n])),
                                 removed=tuple(sorted(set(before) - set(judges))))
        here = location(m.output, parent.storage_options)
        holder = next((path for path, fp in taken.get((m.dataset.name, m.dataset.version), [])
                       if not (path == here and (fp == build.fingerprint or fresh))), None)
        return build, holder

    build, holder = candidate(manifest)
    if holder is not None and version is not None:
        raise BuildError(f"--version {version}: {manifest.dataset.name} {version} is already the label of {holder}; "
                         "two versions never share a label: choose another --version")
    first, first_holder = manifest.dataset.version, holder
    while holder is not None:  # the default name is taken: the next free version
        build, holder = candidate(manifest_for(next_version(build.manifest.dataset.version)))
    if build.manifest.dataset.version != first:
        build.note = (f"{build.manifest.dataset.name} {first} already exists ({first_holder}), so this version is "
                      f"{build.manifest.dataset.version}; choose one with --version")
    return check_output(build)


class RefilterWorker:
    """Re-decides the parent's shards; loads a judge (once per worker) only when its fingerprint changed."""

    def __init__(self, build: PreparedRefilter, fingerprint: str):
        self.manifest = build.manifest
        self.out = build.out.for_tasks()  # its files are made durable with the run (`Location.flusher`)
        self.parent = build.parent_dir
        self.fingerprint = fingerprint
        self.rescore, self.removed = set(build.rescore), set(build.removed)
        # a parent of another sample schema has other .json bytes: its samples are re-written, never copied
        parent = build.parent_manifest or {}
        self.copyable = parent.get("sample_schema") == SAMPLE_SCHEMA_VERSION
        # the parent's files are what this code would write only when its write stage is this one
        stages = {s.get("stage"): s.get("version") for s in parent.get("stage_fingerprints", [])}
        self.same_writer = stages.get(ShardWriting.name) == ShardWriting.version
        # every stored score stays as it is (only the decision can change) when no judge runs again or goes,
        # the derived scores' inputs and code are the parent's and so is the identity table
        before = parent.get("build_manifest", {}).get("filter", {})
        au = self.manifest.filter.au
        self.same_scores = (not self.rescore and not self.removed and stages.get(Filtering.name) == Filtering.version
                            and before.get("au", {}).get("aus") == au.aus
                            and before.get("au", {}).get("present_threshold") == au.present_threshold
                            and before.get("identity", {}).get("duplicate_cosine")
                            == self.manifest.filter.identity.duplicate_cosine)
        self.published = {}  # shard name -> {file: its published sha256, md5, bytes}: what is read from the parent
        for entry in parent.get("shards", []):
            self.published[entry["path"].removesuffix(".tar")] = {
                entry["path"]: entry, **{entry[k]["path"]: entry[k] for k in ("sidecar", "scores")}}
        self.judges: Judges | None = None
        self._judging = threading.Lock()  # two shards may run at once (local threads); the judges are not shared

    def _judges(self) -> Judges:
        if self.judges is None:
            cfg = self.manifest.filter
            self.judges = Judges(cfg, judge_specs(cfg), run=self.rescore)
        return self.judges

    def _score(self, image: bytes, embedding: Any) -> dict[str, Any]:
        with self._judging:
            return self._judges().score(decode_image(image), embedding)

    def close(self) -> None:
        if self.judges is not None:
            self.judges.close()

    def reembed_identities(self, block: IdentityBlock) -> dict[str, Any]:
        """The parent's reference faces embedded by a changed identity judge (their duplicates kept)."""
        forget(self.out, block.name)
        rows = identity_table.read_rows(self.parent, block.identities)
        images = {r["identity"]: decode_image(r["reference_png"]) for r in rows}
        with self._judging:
            embeddings = self._judges().reference_embeddings(images)
        table = pa.Table.from_pylist([{**r, "embedding": embeddings[r["identity"]]} for r in rows],
                                     schema=identity_table.IDENTITY_SCHEMA)
        written = identity_table.write_block(self.out, block.name, table)
        return write_done(self.out, block.name, self.fingerprint, written, stats={})

    def make_shard(self, shard: ShardSlots) -> dict[str, Any]:
        """Re-decide one shard of the parent from its scores table; kept samples whose scores did not change
        are copied as raw tar bytes with their sidecar rows, so a threshold-only change decodes nothing."""
        forget(self.out, shard.name)
        start = time.perf_counter()
        m, cfg = self.manifest, self.manifest.filter
        scores_file = scores_path(shard.name)
        published = self.published[shard.name]
        scores_bytes = read_verified(self.parent, scores_file, published[scores_file])
        if self.same_scores and self.copyable and self.same_writer:  # the columns a decision needs, nothing else
            table = parquet_from_bytes(scores_bytes, DECISION)
            reasons = table.column("drop_reason").to_pylist()
            scores = parse_json(f"[{','.join(table.column('scores').to_pylist())}]")  # the shard's rows in one call
            if all(r == "duplicate_identity" or decide(s, cfg) == r for s, r in zip(scores, reasons)):
                return self._copy_shard(shard, table.column("key").to_pylist(), reasons, {scores_file: scores_bytes},
                                        start)
        rows = parquet_from_bytes(scores_bytes, METADATA).to_pylist()
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
                    members = tar_members(self._read(shard, f"{shard.name}.tar"))
                return members[row["key"]][row["image_ext"]]
            if stored is None:  # dropped images are read only when some are needed
                table = parquet_from_bytes(scores_bytes, ["key", "image"])
                stored = dict(zip(table.column("key").to_pylist(), table.column("image").to_pylist()))
            return stored[row["key"]]

        filt = StageStats(Filtering.name, Filtering.version)
        dup = duplicate_stats(len(rows))
        unchanged: list[str] = []
        decided_before = [(r["keep"], r["drop_reason"], r["scores"]) for r in rows]
        need_image: list[dict[str, Any]] = []
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
                    raw.update(self._score(image(row), person["embedding"]))
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
            after = compact_json(scores)  # as the build wrote `before`
            row.update(scores=after, keep=reason is None, drop_reason=reason, image=None)
            if reason is None and row["key"] in parent_kept and after == before and self.copyable:
                unchanged.append(row["key"])  # same members as in the parent: copied, not rebuilt
            elif reason is None or scores.get("image_valid"):
                need_image.append(row)
        filt.seconds = time.perf_counter() - start
        if self.copyable and self.same_writer and decided_before == [(r["keep"], r["drop_reason"], r["scores"]) for r in rows]:
            return self._copy_shard(shard, [r["key"] for r in rows], [r["drop_reason"] for r in rows],
                                    {scores_file: scores_bytes}, start)
        for row in need_image:
            row["image"] = image(row)
        copies = {}
        if unchanged:  # the parent's tar and sidecar are read only when something is copied from them
            segments = tar_segments(self._read(shard, f"{shard.name}.tar"), f"{shard.name}.tar")
            sidecar = {r["key"]: r for r in parquet_from_bytes(self._read(shard, f"{shard.name}.parquet")).to_pylist()}
            copies = {key: (segments[key], sidecar[key]) for key in unchanged}
        writing = ShardWriting(self.out, {"name": m.dataset.name}, model_description(m.model))
        contents, files, write_stats = writing.run(shard.name, rows, copies)
        return write_done(self.out, shard.name, self.fingerprint, files, planned=shard.planned, **contents,
                          stats={s.name: s.to_json() for s in (dup, filt, write_stats)})


    def _read(self, shard: ShardSlots, relative: str) -> bytes:
        """A file of the parent's shard, proven to be the one its run manifest published."""
        return read_verified(self.parent, relative, self.published[shard.name][relative])

    def _copy_shard(self, shard: ShardSlots, keys: list[str], reasons: list[str | None], read: dict[str, bytes],
                    start: float) -> dict[str, Any]:
        """Every sample of the shard is decided as in the parent with the same scores: its three files are the
        parent's, byte for byte (what writing them again would give), so they are copied whole, each streamed
        once and proven against the parent's published digests before it is committed (`read` holds those
        already read), decoding and re-encoding nothing, and hashed no more."""
        decided = time.perf_counter()
        files = shard_files(shard.name)
        published = self.published[shard.name]
        for name in files:
            if name in read:
                self.out.write_bytes(name, read[name])
            else:
                copy_verified(self.parent, name, published[name], self.out)
        dup, filt = duplicate_stats(len(keys)), StageStats(Filtering.name, Filtering.version)
        for reason in reasons:  # (a sample is kept when it has no drop reason)
            if reason == "duplicate_identity":
                dup.drop(reason)
                continue
            dup.n_out += 1
            filt.n_in += 1
            if reason is None:
                filt.n_out += 1
            else:
                filt.drop(reason)
        filt.seconds = decided - start
        kept = [key for key, reason in zip(keys, reasons) if reason is None]
        write = StageStats(ShardWriting.name, ShardWriting.version, n_in=len(kept), n_out=len(kept),
                           seconds=time.perf_counter() - decided)
        return write_done(self.out, shard.name, self.fingerprint, {f: entry_of(published[f]) for f in files},
                          planned=shard.planned, nsamples=len(kept), first_key=kept[0] if kept else None,
                          last_key=kept[-1] if kept else None, stats={s.name: s.to_json() for s in (dup, filt, write)})


def copy_identity_table(parent: Location, counts: dict[str, Any], published: dict[str, Any], fingerprint: str,
                        out: Location) -> dict[str, Any]:
    """A CPU step: the parent's identities.parquet (proven against its `published` digests) as this version's."""
    forget(out, IDENTITIES_TASK)
    name = identity_table.IDENTITIES_FILE
    return write_done(out, IDENTITIES_TASK, fingerprint, {name: copy_verified(parent, name, published, out)},
                      identities=counts["identities"], duplicates=counts["duplicate_identities"], stats={})


class RefilterJob:
    """The re-filter's work: the parent's identity table (re-embedded where that judge changed), then shards."""

    kind = "mifa-filter"
    progress_stages = ("samples", "shards")

    def __init__(self, build: PreparedRefilter):
        self.build = build

    def worker_spec(self, executor) -> WorkerSpec:
        """CPU workers: as many as the cluster holds beside one CPU step; in-process, one worker running two
        shards at once (reading, hashing and writing release the GIL, so one shard's I/O hides the other's)."""
        share = self.build.manifest.resources.filter_cpus
        if hasattr(executor, "cluster"):
            count = max(1, min(len(self.build.plan.shards), int((executor.cluster().get("CPU", 1.0) - share) / share)))
            return WorkerSpec(RefilterWorker, (self.build, self.build.fingerprint), count, share, 0.0)
        return WorkerSpec(RefilterWorker, (self.build, self.build.fingerprint), 1, share, 0.0, concurrency=2)

    def identity_phase(self, runner: Runner, pool) -> dict[str, Any]:
        """The parent's identity table, re-embedded when the identity judge changed, duplicates re-decided."""
        if "identity" in self.build.rescore:
            return make_identity_table(runner, pool, "reembed_identities")
        parent = self.build.parent_manifest
        if self.build.manifest.filter.identity.duplicate_cosine == parent["build_manifest"]["filter"]["identity"]["duplicate_cosine"]:
            # the same embeddings and threshold give the same table: the parent's file, copied where the work runs
            _, record = next(runner.executor.map(copy_identity_table, [runner.out], self.build.parent_dir,
                                                 parent["counts"], parent["identities"], self.build.fingerprint))
            return record
        return make_identity_table(runner, pool, None, (self.build.parent_dir, [identity_table.IDENTITIES_FILE]))

    def lineage(self) -> dict[str, Any]:
        parent = self.build.parent_manifest
        return {"kind": self.kind, "parent": {
            "fingerprint": parent["fingerprint"], "path": self.build.parent_dir.url,
            "version": parent["dataset"]["version"]}}

    def inherited_stages(self) -> dict[str, dict[str, Any]]:
        return {k: v for k, v in self.build.parent_manifest["stages"].items() if k in ("prompts", "identities", "generate")}

    def annotate(self, content: dict[str, Any]) -> None:
        content["stages"].setdefault(Filtering.name, StageStats(Filtering.name, Filtering.version).to_json())
        content["stages"][Filtering.name]["rescored_judges"] = list(self.build.rescore)
        parent = self.build.parent_manifest
        if "skipped_references" in parent:  # the same identities as the parent's
            content["counts"]["skipped_references"] = parent["counts"]["skipped_references"]
            content["skipped_references"] = parent["skipped_references"]


def run_refilter(build: PreparedRefilter, kind: str = "local", progress: bool | None = None,
                 ray_address: str | None = None) -> BuildResult:
    """Run a prepared re-filter on the executor `kind` ('local' or 'ray')."""
    executor = make_executor(kind, build.manifest, ray_address, check=False)
    return Runner(build, executor, RefilterJob(build), progress=progress).run()
