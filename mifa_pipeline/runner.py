"""The build: checks that write nothing, then resume-aware execution, shard writing and the run manifest.

`BuildRunner` owns everything that must be identical whoever executes the units: what is already
done, committing units to the pool, writing shards in global order, the run manifest. Subclasses only
decide where units run: `LocalRunner` here (in-process, no Ray), `RayRunner` in `ray_runner.py`; both
also offer `map_units` for plain CPU steps, which `refilter.py` uses to run `mifa filter` either way.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mifa_pipeline import pool
from mifa_pipeline.config import BuildManifest, canonical_json, checkpoint_dir, sha256_text
from mifa_pipeline.judging import JudgeFileError, judge_specs
from mifa_pipeline.manifest import (MANIFEST_NAME, SCHEMA_VERSION, chain_fingerprints, code_version, model_files,
                                    model_hash, now_iso, package_versions, stage_configs, write_run_manifest)
from mifa_pipeline.plan import BuildPlan, WorkUnit
from mifa_pipeline.progress import BuildProgress
from mifa_pipeline.records import StageStats
from mifa_pipeline.shards import atomic_write_text, write_shard_index
from mifa_pipeline.stages.filter import DuplicateIdentities
from mifa_pipeline.stages.generate import model_description
from mifa_pipeline.stages.identities import reference_files
from mifa_pipeline.stages.write import ShardWriting
from mifa_pipeline.work import GenerationWorker, UnitState, expand_unit, filter_unit

BUILD_STATE = "build.json"  # _work/build.json: which build this folder holds (written before any unit)


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

    @property
    def out(self) -> Path:
        return self.manifest.output

    @property
    def fingerprint(self) -> str:
        return self.fingerprints[-1]["fingerprint"]


def _existing_fingerprint(out: Path) -> str | None:
    for path, read in ((out / MANIFEST_NAME, lambda d: d["fingerprint"]),
                       (out / pool.WORK_DIR / BUILD_STATE, lambda d: d["fingerprint"])):
        if path.is_file():
            try:
                return read(json.loads(path.read_text()))
            except (ValueError, KeyError):
                raise BuildError(f"{path}: unreadable build record; rebuild with --fresh") from None
    return None


def _check_writable(out: Path) -> None:
    probe = out
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise BuildError(f"output {out}: {probe} is a file, not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise BuildError(f"output {out}: {probe} is not writable")


def prepare(manifest: BuildManifest, fresh: bool = False) -> PreparedBuild:
    """Every check that can fail before anything is written: model, references, output folder."""
    ckpt = manifest.model.checkpoint
    folder = checkpoint_dir(ckpt)
    if folder is not None and not folder.exists():
        what = "the packaged demo model is missing (reinstall mifa)" if ckpt == "demo" else "does not exist"
        raise BuildError(f"model.checkpoint: {ckpt} ({folder}): {what}; expected 'demo', 'teacher' or a mifa checkpoint folder")
    ids = manifest.identities
    if ids.source == "folder":
        if not ids.folder.is_dir():
            raise BuildError(f"identities.folder: {ids.folder} is not a folder")
        found = len(reference_files(ids.folder))
        if found < ids.count:
            raise BuildError(f"identities.folder: {ids.folder} holds {found} images, identities.count needs {ids.count}")
    try:
        judges = judge_specs(manifest.filter)
    except JudgeFileError as exc:
        raise BuildError(str(exc)) from None
    files = model_files(ckpt)
    configs = stage_configs(manifest, model_hash(files, ckpt), {n: j.fingerprint for n, j in judges.items()})
    records = files + [j.record for j in judges.values() if j.record]
    build = PreparedBuild(manifest, BuildPlan.from_manifest(manifest), records, chain_fingerprints("", configs),
                          {n: j.fingerprint for n, j in judges.items()}, fresh)
    return _check_output(build)


def _check_output(build: PreparedBuild) -> PreparedBuild:
    """Refuse a folder that holds something else; mark a matching one for resume (or as complete)."""
    out, fresh = build.out, build.fresh
    if out.exists() and not out.is_dir():
        raise BuildError(f"output {out}: exists and is not a folder")
    _check_writable(out)
    existing = _existing_fingerprint(out) if out.is_dir() else None
    if out.is_dir() and any(out.iterdir()) and existing is None:
        raise BuildError(f"output {out}: folder is not empty and holds no mifa build; refusing to write into it")
    if existing is not None and existing != build.fingerprint and not fresh:
        raise BuildError(f"output {out}: holds a build of a different manifest (fingerprint {existing[:12]}, "
                         f"this one {build.fingerprint[:12]}); use --fresh to replace it or --out for a new folder")
    if existing == build.fingerprint and not fresh:
        build.state = "complete" if (out / MANIFEST_NAME).is_file() else "resume"
    return build


def remove_build(out: Path) -> None:
    """--fresh: delete what a mifa build writes, and nothing else."""
    shutil.rmtree(out / pool.WORK_DIR, ignore_errors=True)
    for p in out.iterdir():
        if p.is_file() and (p.suffix in (".tar", ".parquet", ".tmp") or p.name in (MANIFEST_NAME, "shardindex.json")):
            p.unlink()


@dataclass
class BuildResult:
    state: str
    manifest: dict[str, Any]
    wall_seconds: float
    units_run: int = 0


class BuildRunner:
    """Shared build logic; subclasses implement `execute` (where units run)."""

    name = "base"
    progress_stages = ("prompts", "identities", "generate", "filter", "write")

    def __init__(self, build: PreparedBuild, progress: bool | None = None):
        self.build = build
        self.manifest = build.manifest
        self.out = build.out
        self.show_progress = progress
        self.progress: BuildProgress | None = None
        on = "identity" in build.judges
        self.duplicates = DuplicateIdentities(build.manifest.filter.identity.duplicate_cosine) if on else None
        self.duplicate_stats = StageStats("duplicates", DuplicateIdentities.version)

    # ------------------------------------------------------------------ for subclasses
    def execute(self, units: list[WorkUnit]) -> Iterator[UnitState]:
        """Run expand -> generate -> filter for each unit; yield each finished unit, in any order."""
        raise NotImplementedError

    def advance(self, stage: str, n: int) -> None:
        if self.progress is not None:
            self.progress.advance(stage, n)

    # ------------------------------------------------------------------ the build
    def _start_folder(self) -> None:
        out = self.out
        if self.build.fresh and out.is_dir():
            remove_build(out)
        (out / pool.WORK_DIR / "shards").mkdir(parents=True, exist_ok=True)
        state = out / pool.WORK_DIR / BUILD_STATE
        if not state.is_file():
            atomic_write_text(state, json.dumps({
                "fingerprint": self.build.fingerprint, "created": now_iso(),
                "build_manifest": self.manifest.model_dump(mode="json"),
            }, indent=2) + "\n")
        pool.clean_partial(out)
        for tmp in out.glob("*.tmp"):
            tmp.unlink()

    def run(self) -> BuildResult:
        start = time.perf_counter()
        if self.build.state == "complete":
            content = json.loads((self.out / MANIFEST_NAME).read_text())
            return BuildResult("complete", content, 0.0)
        created_folder = not self.out.exists()
        self._start_folder()
        units = self.build.plan.units
        committed_before = {u.index for u in units if pool.is_committed(self.out, u)}
        pending = [u for u in units if u.index not in committed_before]
        m = self.manifest
        writer = ShardWriting(self.out, m.writer, m.dataset.split,
                              {"name": m.dataset.name, "version": m.dataset.version},
                              model_description(m.model), markers=self.out / pool.WORK_DIR / "shards")
        spi = m.identities.samples_per_identity
        done_samples = sum(len(units[i].identities) * spi for i in committed_before)
        totals = {"prompts": self.build.plan.total_samples, "identities": m.identities.count,
                  "generate": self.build.plan.total_samples, "filter": self.build.plan.total_samples, "write": None}
        done = {"prompts": done_samples, "generate": done_samples, "filter": done_samples,
                "identities": sum(len(units[i].identities) for i in committed_before)}
        committed_now = 0
        try:
            totals = {k: v for k, v in totals.items() if k in self.progress_stages}
            with BuildProgress(totals, done, enabled=self.show_progress) as self.progress:
                next_unit = self._write_ready(units, 0, writer)
                for state in self.execute(pending):
                    self.commit(state)
                    committed_now += 1
                    self.progress.log(f"committed {state.unit.name} ({committed_now}/{len(pending)})")
                    next_unit = self._write_ready(units, next_unit, writer)
                if next_unit != len(units):
                    raise BuildError(f"internal: {len(units) - next_unit} unit(s) never finished")
                shards = writer.finish()
                self.advance("write", 0)
        except BaseException:
            writer.abort()
            if created_folder and committed_now == 0 and not committed_before:
                shutil.rmtree(self.out, ignore_errors=True)  # a first run that failed early leaves nothing
            raise
        finally:
            self.progress = None
        index = write_shard_index(self.out, m.dataset.name, shards)
        content = self._run_manifest(shards, writer.stats, index, time.perf_counter() - start, len(pending))
        write_run_manifest(self.out, content)
        return BuildResult("resumed" if committed_before else "built", content, time.perf_counter() - start, len(pending))

    def commit(self, state: UnitState) -> None:
        pool.commit_unit(self.out, state.unit, state.people, state.samples, state.stats,
                         self.manifest.writer.image_format, self.build.judges)

    def _write_ready(self, units: list[WorkUnit], next_unit: int, writer: ShardWriting) -> int:
        """Feed committed units to the shard writer in order, as far as the committed prefix reaches.

        This ordered pass is also where identities are compared with earlier ones (duplicates): it is the
        one place that sees every identity in global order, on every run, resumed or not. On a resume the
        units whose shards exist already are replayed from their metadata, without reading their images.
        """
        while next_unit < len(units) and pool.is_committed(self.out, units[next_unit]):
            unit = units[next_unit]
            replay = writer.already_written(1)  # a resume, at a shard an earlier run wrote: metadata first
            rows = pool.read_sample_metadata(self.out, unit) if replay else pool.read_samples(self.out, unit)
            rows = self._drop_duplicates(unit, [r for r in rows if r["keep"]])
            if replay and not writer.already_written(len(rows)):  # reaches a shard still to write
                images = {r["key"]: r["image"] for r in pool.read_samples(self.out, unit, ["key", "image"])}
                rows = [{**r, "image": images[r["key"]]} for r in rows]
            writer.add(rows)
            self.advance("write", len(rows))
            next_unit += 1
        return next_unit

    def _drop_duplicates(self, unit: WorkUnit, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        if self.duplicates is None:
            return rows
        nearest = {p["identity"]: self.duplicates.nearest(p["embedding"])
                   for p in pool.read_identities(self.out, unit, ["identity", "embedding"])}
        kept = []
        self.duplicate_stats.n_in += len(rows)
        for row in rows:
            scores = json.loads(row["scores"])
            scores["identity_nearest_earlier_cosine"] = nearest[row["identity"]]
            row["scores"] = json.dumps(scores, separators=(",", ":"))
            if self.duplicates.is_duplicate(nearest[row["identity"]]):
                self.duplicate_stats.drop("duplicate_identity")
            else:
                kept.append(row)
        self.duplicate_stats.n_out += len(kept)
        return kept

    def _stage_totals(self, writer_stats: StageStats) -> dict[str, dict[str, Any]]:
        totals: dict[str, StageStats] = {}
        for unit in self.build.plan.units:
            for name, s in pool.read_stats(self.out, unit).items():
                part = StageStats(name, s["version"], s["in"], s["out"], dict(s["dropped"]), s["seconds"])
                totals.setdefault(name, StageStats(name, s["version"])).merge(part)
        if self.duplicates is not None:
            totals[self.duplicate_stats.name] = self.duplicate_stats
        totals[writer_stats.name] = writer_stats
        return {name: s.to_json() for name, s in totals.items()}

    def lineage(self) -> dict[str, Any]:
        """What kind of version this is and what it derives from (a build has no parent)."""
        return {"kind": "mifa-build", "parent": None}

    def _run_manifest(self, shards, writer_stats, index: Path, wall: float, units_run: int) -> dict[str, Any]:
        m = self.manifest
        return {
            "schema_version": SCHEMA_VERSION,
            **self.lineage(),
            "dataset": {"name": m.dataset.name, "version": m.dataset.version, "split": m.dataset.split,
                        "description": m.dataset.description},
            "fingerprint": self.build.fingerprint,
            "stage_fingerprints": self.build.fingerprints,
            "build_manifest": m.model_dump(mode="json"),
            "build_manifest_sha256": sha256_text(canonical_json(m.model_dump(mode="json"))),
            "code": code_version(),
            "packages": package_versions(),
            "runner": self.name,
            "models": [*self.build.models],
            "model": model_description(m.model),
            "au_names": list(m.prompts.au_names),
            "counts": {"identities": m.identities.count, "planned_samples": self.build.plan.total_samples,
                       "kept_samples": sum(s.nsamples for s in shards)},
            "stages": self._stage_totals(writer_stats),
            "shards": [s.to_json() for s in shards],
            "shard_index": index.name,
            "finished": now_iso(),
            "wall_seconds_last_run": round(wall, 2),
            "units_run_last": units_run,
        }


class LocalRunner(BuildRunner):
    """Runs every unit in this process, one after another: no Ray; the reference for the Ray runner."""

    name = "local"

    def map_units(self, fn, units: list[WorkUnit], *args) -> Iterator[Any]:
        """`fn(*args, unit)` for each unit (a CPU step), results in any order."""
        for unit in units:
            yield fn(*args, unit)

    def execute(self, units: list[WorkUnit]) -> Iterator[UnitState]:
        if not units:
            return
        worker = GenerationWorker(self.manifest)
        worker.setup()
        for unit in units:
            state = expand_unit(self.manifest, unit)
            self.advance("prompts", len(state.samples))
            state = worker.process(state)
            self.advance("identities", len(state.people))
            self.advance("generate", len(state.samples))
            state = filter_unit(self.manifest, state, worker.resolution)
            self.advance("filter", len(state.samples))
            yield state
