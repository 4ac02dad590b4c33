"""What happens to one work unit, cut where a runner may put a process boundary.

    expand_unit (CPU)  ->  GenerationWorker.process (GPU: identities + generation)  ->  filter_unit (CPU)

The local runner calls these in a loop; the Ray runner runs the first and last as tasks and holds
GenerationWorker in an actor pool. Neither the stages nor these functions know which one drives them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from mifa_pipeline.config import BuildManifest
from mifa_pipeline.judging import Judges, judge_specs
from mifa_pipeline.plan import WorkUnit
from mifa_pipeline.records import IdentityRecord, SampleRecord, StageStats
from mifa_pipeline.shards import encode_image
from mifa_pipeline.stages.filter import Filtering
from mifa_pipeline.stages.identities import IdentitySampling
from mifa_pipeline.stages.prompts import PromptExpansion


@dataclass
class UnitState:
    """A unit in flight: its identities, its samples and what each stage so far reported."""

    unit: WorkUnit
    people: list[IdentityRecord]
    samples: list[SampleRecord]
    stats: list[StageStats] = field(default_factory=list)

    @property
    def people_by_id(self) -> dict[int, IdentityRecord]:
        return {p.identity: p for p in self.people}


TEACHER_RESOLUTION = 128


def uses_teacher(manifest: BuildManifest) -> bool:
    return manifest.model.checkpoint == "teacher"


def teacher_identities(manifest: BuildManifest) -> bool:
    """The teacher decides how identities look (as generator, or as the source of reference faces)."""
    return uses_teacher(manifest) or manifest.identities.source == "teacher"


def expand_unit(manifest: BuildManifest, unit: WorkUnit) -> UnitState:
    describe = None
    if teacher_identities(manifest):
        from mifa_pipeline.stages.teacher import describe
    stage = PromptExpansion(manifest.prompts, manifest.seed, manifest.identities.samples_per_identity, describe)
    people, samples, stats = stage.run(unit.identities)
    return UnitState(unit, people, samples, [stats])


class GenerationWorker:
    """Holds the model for its lifetime (one per GPU actor); loads it in `setup`, never at import."""

    def __init__(self, manifest: BuildManifest):
        self.manifest = manifest
        self.generation = None
        self.identities = None

    def setup(self) -> int:
        """Load the model; returns the image resolution (what the filter needs to know)."""
        import torch

        from mifa_pipeline.stages.generate import Generation, load_model

        threads = self.manifest.resources.torch_threads or math.ceil(self.manifest.resources.cpus_per_worker)
        torch.set_num_threads(max(1, threads))
        m = self.manifest
        if uses_teacher(m):
            from mifa_pipeline.stages.teacher import TeacherRendering

            self.generation = TeacherRendering(m.sampler.resolution or TEACHER_RESOLUTION, m.prompts.au_names)
        else:
            model = load_model(m.model, m.sampler)
            self.generation = Generation(m.sampler, model, m.prompts.au_names, m.prompts.negative_prompt)
        painter = self.generation.paint
        if m.identities.source == "teacher":
            from mifa_pipeline.stages.teacher import TeacherRendering

            painter = TeacherRendering(self.generation.resolution, m.prompts.au_names).paint
        self.identities = IdentitySampling(m.identities, self.generation.resolution, painter=painter)
        return self.generation.resolution

    @property
    def resolution(self) -> int:
        return self.generation.resolution

    def process(self, state: UnitState) -> UnitState:
        if self.generation is None:
            self.setup()
        people, id_stats = self.identities.run(state.people)
        samples, gen_stats = self.generation.run(state.samples, {p.identity: p for p in people})
        return UnitState(state.unit, people, samples, [*state.stats, id_stats, gen_stats])


def filter_unit(manifest: BuildManifest, state: UnitState, resolution: int) -> UnitState:
    """Score and decide every sample, then encode its image in the writer's format (CPU work, off the GPU)."""
    judges = None
    specs = judge_specs(manifest.filter)
    if specs:
        judges = Judges(manifest.filter, specs)
    try:
        samples, stats = Filtering(manifest.filter, resolution, judges).run(state.samples, state.people_by_id)
    finally:
        if judges is not None:
            judges.close()
    w = manifest.writer
    for s in samples:
        s.image_bytes = encode_image(s.image, w.image_format, w.quality) if s.scores.get("image_valid") else b""
        s.image = None  # the encoded bytes travel on; the array is no longer needed
    return UnitState(state.unit, state.people, samples, [*state.stats, stats])
