"""What one worker does: make identity blocks, then whole shards, writing its files straight to the output.

    identity block:  prompts (who) -> references (painted / rendered / read) -> embeddings -> block file
    shard:           prompts -> identities (from identities.parquet) -> generation -> judging -> decision
                     -> encoding -> tar + sidecar + scores table -> done record

A `BuildWorker` holds the generator and the judges for its lifetime (one per process: the local executor
makes one, the Ray executor one per actor), so nothing is loaded per task. It returns done records only:
the driver never sees an image. Executors decide where workers run; this module knows none of them.
"""

from __future__ import annotations

import math
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

from mifa_pipeline import identity_table
from mifa_pipeline.config import BuildManifest
from mifa_pipeline.done import check_done, forget, write_done
from mifa_pipeline.judging import Judges, judge_specs
from mifa_pipeline.plan import IdentityBlock, ShardSlots
from mifa_pipeline.records import IdentityRecord, StageStats
from mifa_pipeline.references import TEACHER_RESOLUTION
from mifa_pipeline.shards import decode_image, encode_image
from mifa_pipeline.stages.filter import Filtering
from mifa_pipeline.stages.generate import model_description
from mifa_pipeline.stages.identities import IdentitySampling, make_canvas
from mifa_pipeline.stages.prompts import PromptExpansion
from mifa_pipeline.stages.write import ShardWriting, sample_row
from mifa_pipeline.storage import Location


def duplicate_stats(n_in: int) -> StageStats:
    """The `duplicates` stage of a shard: samples of duplicate identities, dropped before generation."""
    return StageStats("duplicates", "2", n_in=n_in)


def uses_teacher(manifest: BuildManifest) -> bool:
    return manifest.model.checkpoint == "teacher"


def teacher_identities(manifest: BuildManifest) -> bool:
    """The teacher decides how identities look (as generator, or as the source of reference faces)."""
    return uses_teacher(manifest) or manifest.identities.source == "teacher"


def prompt_stage(manifest: BuildManifest) -> PromptExpansion:
    describe = None
    if teacher_identities(manifest):
        from mifa_pipeline.stages.teacher import describe
    return PromptExpansion(manifest.prompts, manifest.seed, manifest.identities.samples_per_identity, describe)


def check_task(out: Location, fingerprint: str, name: str) -> tuple[dict[str, Any] | None, str]:
    """(record or None, why not): the CPU step a resume runs for every task that has a done record."""
    return check_done(out, name, fingerprint)


class BuildWorker:
    """Holds the model and the judges (loaded once, in `setup`); makes identity blocks and shards."""

    def __init__(self, manifest: BuildManifest, out: Location, fingerprint: str, references: list[str] | None = None):
        self.manifest = manifest
        self.references = references  # source=folder: the files prepare checked (identity i takes the i-th)
        self.out = out.for_tasks()  # its files are made durable with the run (`Location.flusher`)
        self.fingerprint = fingerprint
        self.generation = None
        self.identities = None
        self.judges = None
        self.prompts = prompt_stage(manifest)
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}:{id(self):x}"
        self._setup, self._generating, self._finishing = threading.Lock(), threading.Lock(), threading.Lock()

    def __getstate__(self) -> dict[str, Any]:  # locks do not pickle; a copy gets its own
        return {k: v for k, v in self.__dict__.items() if k not in ("_setup", "_generating", "_finishing")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._setup, self._generating, self._finishing = threading.Lock(), threading.Lock(), threading.Lock()

    def setup(self) -> int:
        """Load the generator and the judges (once, whichever thread asks first); returns the resolution."""
        with self._setup:
            return self._load()

    def _load(self) -> int:
        if self.generation is not None:
            return self.generation.resolution
        m = self.manifest
        if uses_teacher(m):  # (OpenCV: no torch to import, a second of a small build)
            from mifa_pipeline.stages.teacher import TeacherRendering

            self.generation = TeacherRendering(m.sampler.resolution or TEACHER_RESOLUTION, m.prompts.au_names)
        else:
            import torch

            from mifa_pipeline.stages.generate import Generation, load_model

            torch.set_num_threads(max(1, m.resources.torch_threads or math.ceil(m.resources.cpus_per_worker)))
            self.generation = Generation(m.sampler, load_model(m.model, m.sampler), m.prompts.au_names,
                                         m.prompts.negative_prompt)
        painter = self.generation.paint
        if m.identities.source == "teacher":
            from mifa_pipeline.stages.teacher import TeacherRendering

            painter = TeacherRendering(self.generation.resolution, m.prompts.au_names).paint
        files = None if self.references is None else [Path(p) for p in self.references]
        self.identities = IdentitySampling(m.identities, self.generation.resolution, painter=painter, files=files)
        specs = judge_specs(m.filter)
        self.judges = Judges(m.filter, specs) if specs else None
        return self.generation.resolution

    def close(self) -> None:
        if self.judges is not None:
            self.judges.close()

    # ------------------------------------------------------------------ identity phase
    def make_identity_block(self, block: IdentityBlock) -> dict[str, Any]:
        self.setup()
        forget(self.out, block.name)
        start = time.perf_counter()
        with self._generating:  # the painter may be the generator
            people, stats = self.identities.run([self.prompts.identity(i) for i in block.identities])
        with self._finishing:
            if self.judges is not None and "identity" in self.judges.run:
                embeddings = self.judges.reference_embeddings({p.identity: p.reference for p in people})
                for p in people:
                    p.embedding = embeddings[p.identity]
            # encoding the reference faces is the stage's work, as a sample's encoding is the filter stage's
            table = identity_table.block_table(people)
        stats.seconds = time.perf_counter() - start
        written = identity_table.write_block(self.out, block.name, table)
        return write_done(self.out, block.name, self.fingerprint, written, stats={stats.name: stats.to_json()})

    # ------------------------------------------------------------------ sample phase
    def _people(self, shard: ShardSlots) -> tuple[dict[int, IdentityRecord], dict[int, dict[str, Any]]]:
        """The shard's identities (reference, mask, canvas, embedding) and their identity-table rows."""
        rows = {r["identity"]: r for r in identity_table.read_rows(
            self.out, shard.identities, ["reference_png", "mask_png", "embedding", "nearest_earlier_cosine", "duplicate"])}
        people = {}
        for i, row in rows.items():
            person = self.prompts.identity(i)
            person.reference, person.mask = decode_image(row["reference_png"]), decode_image(row["mask_png"], "L")
            person.canvas = make_canvas(person.reference, person.mask)
            person.embedding = row["embedding"]  # embedded in the identity phase: judged again by no shard
            people[i] = person
        return people, rows

    def make_shard(self, shard: ShardSlots) -> dict[str, Any]:
        """Generate, judge and write one shard; returns its done record.

        Two calls may run at once (the Ray executor gives this worker two threads): one generates while the
        other judges and writes the shard before, so the generator does not wait for CPU work. Each half is
        one at a time (the model and the judges are not shared between threads)."""
        self.setup()
        forget(self.out, shard.name)
        with self._generating:
            started = time.time()
            made = self._generate(shard)
            activity = self._activity(started, made[-1][-1].seconds)
        with self._finishing:
            return self._finish(shard, *made, generator=activity)

    def _activity(self, started: float, busy: float) -> dict[str, Any]:
        """Which worker generated a shard, when, and its seconds inside generation (the GPU's busy time);
        the run manifest sums them per worker (runner.generator_activity)."""
        gen = self.generation
        return {"worker": self.worker_id, "busy_seconds": round(busy, 4), "started": round(started, 4),
                "ended": round(time.time(), 4), "batch_size": getattr(gen, "batch_size", None),
                "batch_size_source": getattr(gen, "batch_size_source", None), "device": str(getattr(gen, "device", "cpu"))}

    def _generate(self, shard: ShardSlots):
        start = time.perf_counter()
        people, rows = self._people(shard)
        spi = self.manifest.identities.samples_per_identity
        samples = [s for i in shard.identities for s in self.prompts.samples(people[i])
                   if shard.first_slot <= i * spi + s.sample < shard.end_slot]
        prompt_stats = StageStats(PromptExpansion.name, PromptExpansion.version, len(samples), len(samples),
                                  seconds=time.perf_counter() - start)
        dup_stats = duplicate_stats(len(samples))
        generate = []
        for s in samples:
            if rows[s.identity]["duplicate"]:
                s.keep, s.drop_reason = False, "duplicate_identity"
                dup_stats.drop(s.drop_reason)
            else:
                generate.append(s)
        dup_stats.n_out = len(generate)
        generate, gen_stats = self.generation.run(generate, people)
        return people, rows, samples, generate, [prompt_stats, dup_stats, gen_stats]

    def _finish(self, shard: ShardSlots, people, rows, samples, generate, stats,
                generator: dict[str, Any] | None = None) -> dict[str, Any]:
        m, w = self.manifest, self.manifest.writer
        generate, filter_stats = Filtering(m.filter, self.generation.resolution, self.judges).run(generate, people)
        encoding = time.perf_counter()
        for s in generate:
            s.image_bytes = encode_image(s.image, w.image_format, w.quality) if s.scores.get("image_valid") else None
            s.image = None
        filter_stats.seconds += time.perf_counter() - encoding  # the filter stage encodes, off the generator
        for s in samples:  # every planned sample, generated or not, says how close its identity is to an earlier one
            s.scores["identity_nearest_earlier_cosine"] = rows[s.identity]["nearest_earlier_cosine"]
        writing = ShardWriting(self.out, {"name": m.dataset.name}, model_description(m.model))
        contents, files, write_stats = writing.run(shard.name, [sample_row(s, people[s.identity], w.image_format)
                                                                for s in samples])
        stats = [*stats, filter_stats, write_stats]
        extra = {} if generator is None else {"generator": generator}
        return write_done(self.out, shard.name, self.fingerprint, files, planned=shard.planned, **contents,
                          stats={s.name: s.to_json() for s in stats}, **extra)
