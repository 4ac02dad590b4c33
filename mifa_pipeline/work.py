"""What one worker does: make identity blocks, then whole shards, writing its files straight to the output.

    identity block:  prompts (who) -> references (painted / rendered / read) -> embeddings -> block file
    shard:           prompts -> identities (from identities.parquet) -> generation -> judging -> decision
                     -> encoding -> tar + sidecar + scores table -> done record

A `BuildWorker` holds the generator and the judges for its lifetime (one per process: the local executor
makes one, the Ray executor one per actor), so nothing is loaded per task. It returns done records only:
the driver never sees an image. Executors decide where workers run; this module knows none of them.
"""

from __future__ import annotations

import io
import math
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from mifa_pipeline import identity_table
from mifa_pipeline.config import BuildManifest
from mifa_pipeline.done import check_done, forget, write_done
from mifa_pipeline.judging import Judges, judge_specs
from mifa_pipeline.plan import IdentityBlock, ShardSlots
from mifa_pipeline.records import IdentityRecord, StageStats
from mifa_pipeline.shards import encode_image
from mifa_pipeline.stages.filter import Filtering
from mifa_pipeline.stages.generate import model_description
from mifa_pipeline.stages.identities import IdentitySampling, make_canvas
from mifa_pipeline.stages.prompts import PromptExpansion
from mifa_pipeline.stages.write import ShardWriting, sample_row

TEACHER_RESOLUTION = 128
DUPLICATE_STAGE = "duplicates"


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


def decode_png(data: bytes, mode: str = "RGB") -> np.ndarray:
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert(mode), dtype=np.uint8).copy()


def check_task(out: str, fingerprint: str, name: str) -> tuple[dict[str, Any] | None, str]:
    """(record or None, why not): the CPU step a resume runs for every task that has a done record."""
    return check_done(Path(out), name, fingerprint)


class BuildWorker:
    """Holds the model and the judges (loaded once, in `setup`); makes identity blocks and shards."""

    def __init__(self, manifest: BuildManifest, out: str, fingerprint: str):
        self.manifest = manifest
        self.out = Path(out)
        self.fingerprint = fingerprint
        self.generation = None
        self.identities = None
        self.judges = None
        self.prompts = prompt_stage(manifest)
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
        import torch

        from mifa_pipeline.stages.generate import Generation, load_model

        m = self.manifest
        threads = m.resources.torch_threads or math.ceil(m.resources.cpus_per_worker)
        torch.set_num_threads(max(1, threads))
        if uses_teacher(m):
            from mifa_pipeline.stages.teacher import TeacherRendering

            self.generation = TeacherRendering(m.sampler.resolution or TEACHER_RESOLUTION, m.prompts.au_names)
        else:
            self.generation = Generation(m.sampler, load_model(m.model, m.sampler), m.prompts.au_names,
                                         m.prompts.negative_prompt)
        painter = self.generation.paint
        if m.identities.source == "teacher":
            from mifa_pipeline.stages.teacher import TeacherRendering

            painter = TeacherRendering(self.generation.resolution, m.prompts.au_names).paint
        self.identities = IdentitySampling(m.identities, self.generation.resolution, painter=painter)
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
        stats.seconds = time.perf_counter() - start
        relative = identity_table.block_path(block.name)
        (self.out / relative).parent.mkdir(parents=True, exist_ok=True)
        from mifa_pipeline.shards import write_parquet_atomic

        write_parquet_atomic(identity_table.block_table(people), self.out / relative)
        return write_done(self.out, block.name, self.fingerprint, [relative], stats={stats.name: stats.to_json()})

    # ------------------------------------------------------------------ sample phase
    def _people(self, shard: ShardSlots) -> dict[int, tuple[IdentityRecord, dict[str, Any]]]:
        rows = identity_table.read_rows(self.out, shard.identities,
                                        ["reference_png", "mask_png", "embedding", "nearest_earlier_cosine", "duplicate"])
        people = {}
        for row in rows:
            person = self.prompts.identity(row["identity"])
            person.reference, person.mask = decode_png(row["reference_png"]), decode_png(row["mask_png"], "L")
            person.canvas = make_canvas(person.reference, person.mask)
            person.embedding = row["embedding"]
            people[person.identity] = (person, row)
        return people

    def make_shard(self, shard: ShardSlots) -> dict[str, Any]:
        """Generate, judge and write one shard; returns its done record.

        Two calls may run at once (the Ray executor gives this worker two threads): one generates while the
        other judges and writes the shard before, so the generator does not wait for CPU work. Each half is
        one at a time (the model and the judges are not shared between threads)."""
        self.setup()
        forget(self.out, shard.name)
        with self._generating:
            made = self._generate(shard)
        with self._finishing:
            return self._finish(shard, *made)

    def _generate(self, shard: ShardSlots):
        m = self.manifest
        start = time.perf_counter()
        people = self._people(shard)
        spi = m.identities.samples_per_identity
        samples = [s for i in shard.identities for s in self.prompts.samples(people[i][0])
                   if shard.first_slot <= i * spi + s.sample < shard.end_slot]
        prompt_stats = StageStats(PromptExpansion.name, PromptExpansion.version, len(samples), len(samples),
                                  seconds=time.perf_counter() - start)
        dup_stats = StageStats(DUPLICATE_STAGE, "2", n_in=len(samples))
        generate = []
        for s in samples:
            row = people[s.identity][1]
            if row["duplicate"]:
                s.keep, s.drop_reason = False, "duplicate_identity"
                s.scores = {"identity_nearest_earlier_cosine": row["nearest_earlier_cosine"]}
                dup_stats.drop("duplicate_identity")
            else:
                generate.append(s)
        dup_stats.n_out = len(generate)
        by_id = {i: p for i, (p, _) in people.items()}
        generate, gen_stats = self.generation.run(generate, by_id)
        return people, samples, generate, [prompt_stats, dup_stats, gen_stats]

    def _finish(self, shard: ShardSlots, people, samples, generate, stats) -> dict[str, Any]:
        m = self.manifest
        by_id = {i: p for i, (p, _) in people.items()}
        generate, filter_stats = Filtering(m.filter, self.generation.resolution, self.judges).run(generate, by_id)
        w = m.writer
        encoding = time.perf_counter()
        for s in generate:
            s.scores["identity_nearest_earlier_cosine"] = people[s.identity][1]["nearest_earlier_cosine"]
            s.image_bytes = encode_image(s.image, w.image_format, w.quality) if s.scores.get("image_valid") else None
            s.image = None
        filter_stats.seconds += time.perf_counter() - encoding  # the filter stage encodes, off the generator
        rows = [sample_row(s, by_id[s.identity], w.image_format) for s in samples]
        writing = ShardWriting(self.out, {"name": m.dataset.name}, model_description(m.model))
        info, files, write_stats = writing.run(shard.name, rows)
        stats = [*stats, filter_stats, write_stats]
        return write_done(self.out, shard.name, self.fingerprint, files, planned=shard.planned, nsamples=info.nsamples,
                          first_key=info.first_key, last_key=info.last_key,
                          stats={s.name: s.to_json() for s in stats})
