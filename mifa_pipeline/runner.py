"""The build: checks that write nothing, then the output lock, the identity phase, the shard phase, the run manifest.

`Runner` owns what must be the same whoever executes the work: taking the output, what is already done
(proven by done records), which tasks to (re)do, the shard index and the run manifest. A job says what the
work is (`BuildJob` here: generate; `refilter.RefilterJob`: re-decide a parent's shards), an executor where
it runs (`executors.LocalExecutor`, `ray_executor.RayExecutor`). The driver handles done records only.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from mifa_pipeline import identity_table
from mifa_pipeline.card import CARD_FILES, card_texts, write_card
from mifa_pipeline.config import BuildManifest, canonical_json, checkpoint_dir, sha256_text, thresholds_no_sample_passes
from mifa_pipeline.done import DONE_DIR, WORK_DIR, any_done, done_names, forget, write_done
from mifa_pipeline.executors import Executor, WorkerSpec
from mifa_pipeline.judging import JudgeFileError, judge_specs
from mifa_pipeline.lease_lock import LeaseLock
from mifa_pipeline.lock import LOCK_NAME, OutputLock, OutputLockError
from mifa_pipeline.manifest import (MANIFEST_NAME, SCHEMA_VERSION, chain_fingerprints, code_version, model_files,
                                    model_hash, now_iso, package_versions, read_run_manifest, stage_configs,
                                    write_run_manifest)
from mifa_pipeline.plan import BuildPlan, ShardSlots
from mifa_pipeline.progress import BuildProgress
from mifa_pipeline.records import StageStats
from mifa_pipeline.sample_schema import SAMPLE_SCHEMA_VERSION
from mifa_pipeline.shards import SHARD_INDEX, TMP_MARK, ShardInfo, write_shard_index
from mifa_pipeline.stages.generate import model_description
from mifa_pipeline.references import ReferenceError, check_references
from mifa_pipeline.stages.write import SCORES_DIR
from mifa_pipeline.storage import Flush, Location, StorageError
from mifa_pipeline.work import BuildWorker, check_task

BUILD_STATE = "build.json"  # _work/build.json: which build this folder holds (written before any task)
IDENTITIES_TASK = "identities"  # the done record of the published identity table
REDO_LABELS = {IDENTITIES_TASK: identity_table.IDENTITIES_FILE}
STAGE_ORDER = ("prompts", "identities", "duplicates", "generate", "filter", "write")


def output_lock(out: "Location", purpose: str) -> "OutputLock | LeaseLock":
    """One run per output: a lock file on a disk (lock.py), a leased lock object on an object store (lease_lock.py)."""
    return OutputLock(out.local(), purpose) if out.is_local else LeaseLock(out, purpose)


class BuildError(RuntimeError):
    """A problem the user can fix; the CLI prints it without a traceback and exits non-zero."""


@dataclass
class PreparedBuild:
    manifest: BuildManifest
    plan: BuildPlan
    models: list[dict[str, Any]]
    fingerprints: list[dict[str, str]]
    judges: dict[str, str] = field(default_factory=dict)  # judge name -> fingerprint (see judging.py)
    fresh: bool = False
    state: str = "new"  # new | resume | complete
    references: list[str] | None = None  # source=folder: the checked reference files, identity i takes the i-th
    skipped_references: list[dict[str, str]] = field(default_factory=list)  # passed over (no single face)

    @property
    def out(self) -> Location:
        return Location(self.manifest.output, self.manifest.storage_options)

    @property
    def fingerprint(self) -> str:
        return self.fingerprints[-1]["fingerprint"]


# ---------------------------------------------------------------------------------- checks (write nothing)
OLD_LAYOUT = "an earlier mifa layout (work units under _work/units, schema 1) that this version does not read"


def _existing_fingerprint(out: Location, files: list[str]) -> str | None:
    """The fingerprint of the build `out` holds (`files`: what is there): its run manifest's, else its build
    record's, else that of any done record (a lost or emptied build record does not make finished work
    unresumable); None if none."""
    if any(f.startswith(f"{WORK_DIR}/units/") for f in files):
        raise BuildError(f"output {out}: holds a build of {OLD_LAYOUT}; rebuild it with --fresh or into a new folder")
    for path in (MANIFEST_NAME, f"{WORK_DIR}/{BUILD_STATE}"):
        if path in files:
            try:
                data = json.loads(out.read_text(path))
                fingerprint, schema = data["fingerprint"], data.get("schema_version", 1)
            except (ValueError, KeyError, TypeError):
                if path == MANIFEST_NAME:
                    raise BuildError(f"{out.full_url(path)}: unreadable run manifest (damaged?); `mifa verify` says "
                                     "more; remove it to have the next run re-prove every file and write it again") from None
                continue
            if schema != SCHEMA_VERSION:
                raise BuildError(f"output {out}: holds a build of {OLD_LAYOUT}; rebuild it with --fresh or into a new folder")
            return fingerprint
    for record in (f for f in files if f.startswith(f"{DONE_DIR}/") and f.endswith(".json")):
        try:
            return json.loads(out.read_text(record))["fingerprint"]
        except (ValueError, KeyError, TypeError):
            continue
    return None


def _readable_json(out: Location, rel: str) -> bool:
    try:
        json.loads(out.read_text(rel))
        return True
    except (OSError, ValueError):
        return False


def _check_writable(out: Location) -> None:
    if not out.is_local:
        return  # an object store says so at the first write (credentials, bucket), before any work is done
    probe = out.local()
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise BuildError(f"output {out}: {probe} is a file, not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise BuildError(f"output {out}: {probe} is not writable")


def check_thresholds(manifest: BuildManifest, allow_empty: bool) -> None:
    """Refuse filter thresholds that no sample can pass (an empty data set) unless the caller allows it."""
    hopeless = thresholds_no_sample_passes(manifest.filter)
    if hopeless and not allow_empty:
        raise BuildError(f"{'; '.join(hopeless)}: drops every sample, so the data set would be empty; lower it, "
                         "or pass --allow-empty to make it anyway")


def prepare(manifest: BuildManifest, fresh: bool = False, allow_empty: bool = False) -> PreparedBuild:
    """Every check that can fail before anything is written: thresholds, model, references, output folder."""
    check_thresholds(manifest, allow_empty)
    ckpt = manifest.model.checkpoint
    folder = checkpoint_dir(ckpt)
    if folder is not None and not (folder / "maugen_config.json").is_file():  # (before hashing the folder's files)
        what = ("the packaged demo model is missing (reinstall mifa)" if ckpt == "demo" else "does not exist"
                if not folder.exists() else "is not a mifa checkpoint folder (no maugen_config.json)")
        raise BuildError(f"model.checkpoint: {ckpt} ({folder}): {what}; expected 'demo', 'teacher' or a mifa checkpoint folder")
    try:
        judges = judge_specs(manifest.filter)
    except JudgeFileError as exc:
        raise BuildError(str(exc)) from None
    ids = manifest.identities
    references = None
    if ids.source == "folder":
        if not ids.folder.is_dir():
            raise BuildError(f"identities.folder: {ids.folder} is not a folder")
        try:
            references = check_references(manifest, judges)
        except ReferenceError as exc:
            raise BuildError(str(exc)) from None
    files = model_files(ckpt)
    configs = stage_configs(manifest, model_hash(files, ckpt), {n: j.fingerprint for n, j in judges.items()})
    records = files + [j.record for j in judges.values() if j.record]
    build = PreparedBuild(manifest, BuildPlan.from_manifest(manifest), records, chain_fingerprints("", configs),
                          {n: j.fingerprint for n, j in judges.items()}, fresh)
    if references is not None:
        build.references = [str(p) for p in references.files]
        build.skipped_references = references.skipped
    return check_output(build)


def check_output(build: PreparedBuild) -> PreparedBuild:
    """Refuse a folder that holds something else; mark a matching one for resume (or as complete)."""
    fresh = build.fresh
    try:
        out = build.out
    except StorageError as exc:
        raise BuildError(str(exc)) from None
    if out.is_local and out.local().exists() and not out.local().is_dir():
        raise BuildError(f"output {out}: exists and is not a folder")
    _check_writable(out)
    try:
        files = out.find()
    except OSError as exc:  # an object store we cannot list: bad credentials, no such bucket, unreachable
        raise BuildError(f"output {out}: cannot list it ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); "
                         "check the bucket, endpoint (AWS_ENDPOINT_URL / storage_options) and credentials") from None
    try:
        existing = _existing_fingerprint(out, files)
    except BuildError:
        if not fresh:
            raise
        existing = "old layout"
    others = [f for f in files if f != LOCK_NAME]
    if others and existing is None:
        raise BuildError(f"output {out}: folder is not empty and holds no mifa build; refusing to write into it")
    if existing is not None and existing != build.fingerprint and not fresh:
        raise BuildError(f"output {out}: holds a build of a different manifest (fingerprint {existing[:12]}, "
                         f"this one {build.fingerprint[:12]}); use --fresh to replace it or --out for a new folder")
    build.state = "new"
    if existing == build.fingerprint and not fresh:
        build.state = "complete" if MANIFEST_NAME in files else "resume"
    return build


def remove_build(out: Location) -> None:
    """--fresh: delete what a mifa build writes, and nothing else."""
    out.remove_tree(WORK_DIR)
    out.remove_tree(SCORES_DIR)
    for name in out.listdir():
        if name.endswith((".tar", ".parquet")) or TMP_MARK in name or name in (MANIFEST_NAME, SHARD_INDEX, *CARD_FILES):
            out.remove(name)


@contextmanager
def sigterm_as_interrupt():
    """SIGTERM (what Slurm and Kubernetes send) stops a build like Ctrl-C: committed work is kept."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def cluster_check(manifest: BuildManifest):
    """A check of a Ray cluster's resources: refuse a pool it cannot hold instead of hanging (2-CPU deadlock)."""
    r = manifest.resources

    def check(have: dict[str, float]) -> None:
        cpus, gpus = have.get("CPU", 0.0), have.get("GPU", 0.0)
        need_cpus = r.generation_workers * r.cpus_per_worker + r.filter_cpus
        if need_cpus > cpus:
            raise BuildError(
                f"resources: {r.generation_workers} generation worker(s) x cpus_per_worker {r.cpus_per_worker} "
                f"+ filter_cpus {r.filter_cpus} = {need_cpus:g} CPUs, but the Ray cluster has {cpus:g}; "
                "lower resources.generation_workers or resources.cpus_per_worker")
        need_gpus = r.generation_workers * r.gpus_per_worker
        if need_gpus > gpus:
            raise BuildError(f"resources: {r.generation_workers} generation worker(s) x gpus_per_worker "
                             f"{r.gpus_per_worker} = {need_gpus:g} GPUs, but the Ray cluster has {gpus:g}")
    return check


def make_executor(kind: str, manifest: BuildManifest, ray_address: str | None = None, check: bool = True) -> Executor:
    """'local' (this process) or 'ray' (a local Ray, or the cluster at `ray_address`)."""
    if kind == "local":
        from mifa_pipeline.executors import LocalExecutor

        return LocalExecutor()
    if kind != "ray":
        raise BuildError(f"--runner {kind!r}: expected 'ray' or 'local'")
    from mifa_pipeline.ray_executor import RayExecutor

    return RayExecutor(ray_address, manifest.resources.filter_cpus, cluster_check(manifest) if check else None)


def build_data(build: PreparedBuild, kind: str = "local", progress: bool | None = None,
               ray_address: str | None = None) -> "BuildResult":
    """Run a prepared build on the executor `kind` ('local' or 'ray')."""
    return Runner(build, make_executor(kind, build.manifest, ray_address), progress=progress).run()


# ---------------------------------------------------------------------------------- what a build does
class BuildJob:
    """A build's work: identity blocks, the identity table, then shards, all by `BuildWorker`s."""

    kind = "mifa-build"
    progress_stages = ("identities", "samples", "shards")

    def __init__(self, build: PreparedBuild):
        self.build = build

    def worker_spec(self, executor: Executor) -> WorkerSpec:
        r = self.build.manifest.resources
        return WorkerSpec(BuildWorker, (self.build.manifest, self.build.out, self.build.fingerprint,
                                        self.build.references),
                          r.generation_workers, r.cpus_per_worker, r.gpus_per_worker, concurrency=2)

    def identity_phase(self, runner: "Runner", pool) -> dict[str, Any]:
        """Make every identity block not yet proven, then publish the identity table."""
        return make_identity_table(runner, pool, "make_identity_block")

    def lineage(self) -> dict[str, Any]:
        return {"kind": self.kind, "parent": None}

    def inherited_stages(self) -> dict[str, dict[str, Any]]:
        return {}

    def annotate(self, content: dict[str, Any]) -> None:
        """Anything a job adds to the run manifest: for a folder of references, those passed over."""
        if self.build.manifest.identities.source == "folder":
            content["counts"]["skipped_references"] = len(self.build.skipped_references)
            content["skipped_references"] = list(self.build.skipped_references)


def make_identity_table(runner: "Runner", pool, method: str | None,
                        parent: tuple[Location, list[str]] | None = None) -> dict[str, Any]:
    """identities.parquet, recorded: from identity blocks the workers' `method` makes (those not yet proven),
    or, with no method, from existing tables (`parent`: a re-filter's parent and its table); the blocks are
    removed after."""
    out, build = runner.out, runner.build
    blocks = build.plan.blocks
    stats: dict[str, Any] = {}
    source, parts = parent or (out, [])
    if method is not None:
        records = runner.adopt([b.name for b in blocks])
        for block, record in pool.run(method, [b for b in blocks if b.name not in records]):
            records[block.name] = record
            runner.advance("identities", len(block.identities))
        parts = [identity_table.block_path(b.name) for b in blocks]
        stats = {k: v.to_json() for k, v in _sum_stats(r["stats"] for r in records.values()).items()}
    threshold = build.manifest.filter.identity.duplicate_cosine
    _, counts = next(runner.executor.map(publish_identities, [out], source, parts, threshold))
    forget(out, IDENTITIES_TASK)  # a damaged or another build's record: this one replaces it
    record = write_done(out, IDENTITIES_TASK, build.fingerprint, [identity_table.IDENTITIES_FILE], **counts, stats=stats)
    for b in blocks:  # published: the blocks' reference faces live in identities.parquet alone
        forget(out, b.name)
        out.remove(identity_table.block_path(b.name))
    out.prune(identity_table.BLOCKS_DIR)
    return record


def publish_identities(source: Location, parts: list[str], threshold: float | None, out: Location) -> dict[str, int]:
    """A CPU step (so the driver never reads reference faces): blocks -> identities.parquet."""
    return identity_table.publish(out, source, parts, threshold)


def _sum_stats(parts) -> dict[str, StageStats]:
    totals: dict[str, StageStats] = {}
    for stats in parts:
        for name, s in stats.items():
            part = StageStats(name, s["version"], s["in"], s["out"], dict(s["dropped"]), s["seconds"])
            totals.setdefault(name, StageStats(name, s["version"])).merge(part)
    return totals


@dataclass
class BuildResult:
    state: str
    manifest: dict[str, Any]
    wall_seconds: float
    units_run: int = 0  # shards made by this run (the rest were adopted from an earlier one)
    notes: list[str] = field(default_factory=list)


class Runner:
    """Takes the output, runs a job's identity phase and shards on an executor, writes the run manifest."""

    def __init__(self, build: PreparedBuild, executor: Executor, job=None, progress: bool | None = None):
        self.build = build
        self.manifest = build.manifest
        self.out = build.out
        self.executor = executor
        self.job = job or BuildJob(build)
        self.show_progress = progress
        self.progress: BuildProgress | None = None
        self.notes: list[str] = []
        self.lock = None

    # ------------------------------------------------------------------ helpers for jobs
    def advance(self, stage: str, n: int) -> None:
        if self.progress is not None:
            self.progress.advance(stage, n)

    def note(self, message: str) -> None:
        """A line the user should see whatever the progress mode (a redone task, a taken-over lock)."""
        self.notes.append(message)
        if self.progress is not None:
            self.progress.note(message)

    def adopt(self, names: list[str]) -> dict[str, dict[str, Any]]:
        """The tasks among `names` whose done records prove their files (checked where the executor runs CPU
        steps: the driver reads no data file); says why each other recorded one is redone."""
        fp = self.build.fingerprint
        have = done_names(self.out)
        recorded = [n for n in names if n in have]
        adopted = {}
        for name, (record, why) in self.executor.map(check_task, recorded, self.out, fp):
            if record is not None:
                adopted[name] = record
            else:
                self.note(f"{REDO_LABELS.get(name, name)}: redone ({why})")
        return adopted

    # ------------------------------------------------------------------ the run
    def run(self) -> BuildResult:
        start = time.perf_counter()
        lock = self.lock = output_lock(self.out, purpose=self.job.kind)
        try:
            taken = lock.acquire()
        except OutputLockError as exc:
            raise BuildError(str(exc)) from None
        failed = True
        try:
            with sigterm_as_interrupt():
                self.build = check_output(replace(self.build))  # again, now that the output is ours
                if self.build.state == "complete":
                    result = BuildResult("complete", read_run_manifest(self.out), 0.0)
                    if result.manifest.get("sample_schema") and not all(self.out.isfile(n) for n in CARD_FILES):
                        write_card(self.out, result.manifest)
                else:
                    if taken:
                        self.notes.append(taken)
                    resumed = self.build.state == "resume"
                    self._start_folder()
                    result = self._run(start, resumed)
            failed = False
            return result
        finally:
            lock.release()
            if failed and lock.created_folder and not any_done(self.out):
                self._remove_own_start()

    def _start_folder(self) -> None:
        out = self.out
        if self.build.fresh:
            remove_build(out)
        state = f"{WORK_DIR}/{BUILD_STATE}"
        if not _readable_json(out, state):
            out.write_text(state, json.dumps({
                "schema_version": SCHEMA_VERSION, "fingerprint": self.build.fingerprint, "created": now_iso(),
                "build_manifest": self.manifest.model_dump(mode="json"),
            }, indent=2) + "\n")
        if out.is_local:  # ours alone now (we hold the lock): a crashed writer's temporary files
            for folder in ("", SCORES_DIR, DONE_DIR, identity_table.BLOCKS_DIR):
                path = out.local(folder)
                for tmp in path.glob(f".*{TMP_MARK}*") if path.is_dir() else []:
                    tmp.unlink()

    def _remove_own_start(self) -> None:
        """A first run that failed before finishing any task removes what it wrote, and only that."""
        self.out.remove(f"{WORK_DIR}/{BUILD_STATE}")
        for folder in (DONE_DIR, identity_table.BLOCKS_DIR, SCORES_DIR, WORK_DIR, ""):
            self.out.prune(folder)

    def _run(self, start: float, resumed: bool) -> BuildResult:
        shards = self.build.plan.shards
        # the shards' files (committed without fsync: a resume proves them by hash) are made durable as they
        # come in, all of them before the run manifest publishes them
        with self.out.flusher() as flush:
            records, identities, pending = self._tasks(flush)
            if getattr(self.lock, "lost", None):  # an object store's lease lock lost to another run
                raise BuildError(f"{self.lock.lost}; the shards are kept but nothing is published: run again")
            ordered = [records[s.name] for s in shards]
            index = write_shard_index(self.out, self.manifest.dataset.name, [_shard_info(r) for r in ordered])
            wall = time.perf_counter() - start
            content = self._run_manifest(ordered, identities, index, wall, len(pending))
            content["generation_last_run"] = generator_activity([records[s.name] for s in pending], wall)
            self.job.annotate(content)
            card = card_texts(self.out, content)
        write_run_manifest(self.out, content)
        write_card(self.out, content, card)
        return BuildResult("resumed" if resumed else "built", content, wall, len(pending), self.notes)

    def _tasks(self, flush: Flush) -> tuple[dict[str, dict[str, Any]], dict[str, Any], list[ShardSlots]]:
        """Every task proven or done: (shard name -> done record, the identity table's record, the shards this
        run made), each shard's files handed to `flush` as its record comes in."""
        plan, job = self.build.plan, self.job
        totals = {"identities": plan.identities, "samples": plan.total_samples, "shards": len(plan.shards)}
        with BuildProgress({k: totals[k] for k in job.progress_stages}, {}, enabled=self.show_progress) as self.progress:
            for message in self.notes:
                self.progress.note(message)
            pool = None
            try:
                records = self.adopt([s.name for s in plan.shards])
                pending = [s for s in plan.shards if s.name not in records]
                for record in records.values():
                    flush.add(record["files"])
                self.advance("shards", len(records))
                self.advance("samples", sum(r["planned"] for r in records.values()))
                identities = self.adopt([IDENTITIES_TASK]).get(IDENTITIES_TASK)
                if identities is None:  # (even when every shard is proven: a damaged table is never shipped)
                    pool = self.executor.workers(job.worker_spec(self.executor))
                    identities = job.identity_phase(self, pool)
                self.advance("identities", plan.identities)
                if pending:
                    pool = pool or self.executor.workers(job.worker_spec(self.executor))
                    for shard, record in pool.run("make_shard", pending):
                        records[shard.name] = record
                        flush.add(record["files"])
                        self.advance("samples", shard.planned)
                        self.advance("shards", 1)
                        self.progress.log(f"{shard.name}: {record['nsamples']} of {shard.planned} kept")
            finally:
                try:
                    if pool is not None:
                        pool.close()
                finally:
                    self.executor.close()
        return records, identities, pending

    def _run_manifest(self, records: list[dict[str, Any]], identities: dict[str, Any], index: str,
                      wall: float, shards_run: int) -> dict[str, Any]:
        m = self.manifest
        stats = _sum_stats([identities["stats"], *(r["stats"] for r in records)])
        stages = {**self.job.inherited_stages(), **{k: stats[k].to_json() for k in STAGE_ORDER if k in stats}}
        kept = sum(r["nsamples"] for r in records)
        return {
            "schema_version": SCHEMA_VERSION,
            **self.job.lineage(),
            "dataset": {"name": m.dataset.name, "version": m.dataset.version, "split": m.dataset.split,
                        "description": m.dataset.description},
            "fingerprint": self.build.fingerprint,
            "stage_fingerprints": self.build.fingerprints,
            "judges": dict(sorted(self.build.judges.items())),
            "build_manifest": m.model_dump(mode="json"),
            "build_manifest_sha256": sha256_text(canonical_json(m.model_dump(mode="json"))),
            "code": code_version(),
            "packages": package_versions(),
            "runner": self.executor.name,
            "models": [*self.build.models],
            "model": model_description(m.model),
            "au_names": list(m.prompts.au_names),
            "sample_schema": SAMPLE_SCHEMA_VERSION,
            "counts": {"identities": m.identities.count, "planned_samples": self.build.plan.total_samples,
                       "kept_samples": kept,
                       "duplicate_identities": identities["duplicates"]},
            "identities": _file_record(identity_table.IDENTITIES_FILE, identities),
            "stages": stages,
            "shards": [_shard_json(r) for r in records],
            "shard_index": index,
            "finished": now_iso(),
            "wall_seconds_last_run": round(wall, 2),
            "shards_run_last": shards_run,
            "driver_received_bytes_last_run": self.executor.received_bytes,
        }


def generator_activity(records: list[dict[str, Any]], wall: float) -> dict[str, Any]:
    """Per generation worker, its seconds inside generation in this run's shards (`busy_seconds`) against the
    build's wall seconds, and after its first shard (warm-up: model load, compilation, the pipeline filling):
    busy / (end of its last shard - end of its first). A GPU that waits for CPU work shows here."""
    workers: dict[str, dict[str, Any]] = {}
    for r in sorted((r["generator"] for r in records if r.get("generator")), key=lambda g: g["started"]):
        w = workers.setdefault(r["worker"], {"worker": r["worker"], "device": r["device"], "batch_size": r["batch_size"],
                                             "batch_size_source": r["batch_size_source"], "shards": 0,
                                             "busy_seconds": 0.0, "first": r, "last_ended": r["ended"]})
        w["shards"] += 1
        w["busy_seconds"] += r["busy_seconds"]
        w["last_ended"] = max(w["last_ended"], r["ended"])
    out = []
    for w in workers.values():
        first = w.pop("first")
        after, span = w["busy_seconds"] - first["busy_seconds"], w.pop("last_ended") - first["ended"]
        w["busy_seconds"] = round(w["busy_seconds"], 3)
        w["busy_share_of_wall"] = round(w["busy_seconds"] / wall, 4) if wall > 0 else None
        w["busy_share_after_first_shard"] = round(min(1.0, after / span), 4) if w["shards"] > 1 and span > 0 else None
        out.append(w)
    total = sum(w["busy_seconds"] for w in out)
    return {"wall_seconds": round(wall, 3), "workers": out,
            "busy_share_of_wall": round(total / (wall * len(out)), 4) if out and wall > 0 else None}


def _file_record(path: str, record: dict[str, Any]) -> dict[str, Any]:
    return {"path": path, **record["files"][path], "rows": record["identities"]}


def _shard_info(record: dict[str, Any]) -> ShardInfo:
    tar = f"{record['name']}.tar"
    f = record["files"][tar]
    return ShardInfo(tar, record["nsamples"], f["bytes"], f["sha256"], f["md5"], record["first_key"], record["last_key"],
                     f.get("blake3"))


def _shard_json(record: dict[str, Any]) -> dict[str, Any]:
    info = _shard_info(record).to_json()
    files = record["files"]
    sidecar, scores = f"{record['name']}.parquet", f"{SCORES_DIR}/{record['name']}.parquet"
    return {**info, "planned": record["planned"],
            "sidecar": {"path": sidecar, **files[sidecar]}, "scores": {"path": scores, **files[scores]}}
