"""The build plan: which identities and samples exist, which work unit holds them, how many shards at most."""

from __future__ import annotations

from dataclasses import dataclass

from mifa_pipeline.config import BuildManifest


@dataclass(frozen=True)
class WorkUnit:
    """A contiguous block of identities, generated, filtered and committed together (the resume granularity)."""

    index: int
    first_identity: int
    end_identity: int  # exclusive

    @property
    def name(self) -> str:
        return f"unit-{self.first_identity:07d}-{self.end_identity:07d}"

    @property
    def identities(self) -> range:
        return range(self.first_identity, self.end_identity)


@dataclass(frozen=True)
class BuildPlan:
    identities: int
    samples_per_identity: int
    identities_per_unit: int
    samples_per_shard: int

    @classmethod
    def from_manifest(cls, manifest: BuildManifest) -> "BuildPlan":
        return cls(
            identities=manifest.identities.count,
            samples_per_identity=manifest.identities.samples_per_identity,
            identities_per_unit=manifest.resources.identities_per_unit,
            samples_per_shard=manifest.writer.samples_per_shard,
        )

    @property
    def total_samples(self) -> int:
        return self.identities * self.samples_per_identity

    @property
    def max_shards(self) -> int:
        """Shards if nothing is dropped (filtering can only lower it)."""
        return -(-self.total_samples // self.samples_per_shard)

    @property
    def units(self) -> list[WorkUnit]:
        step = self.identities_per_unit
        return [
            WorkUnit(i, first, min(first + step, self.identities))
            for i, first in enumerate(range(0, self.identities, step))
        ]
