"""The build plan: identities in blocks (the identity phase), planned sample slots in shards (the sample phase).

A planned sample has a slot, `identity * samples_per_identity + sample`, its place in global order. Shard k
owns slots [k*S, (k+1)*S) for S = writer.samples_per_shard, whatever was dropped, so what a shard holds is a
function of the build manifest alone: not of worker count, batch size or completion order. A shard holds the
*kept* samples of its slots, so shard sizes vary; the run manifest and `shardindex.json` carry them.
"""

from __future__ import annotations

from dataclasses import dataclass

from mifa_pipeline.config import BuildManifest
from mifa_pipeline.shards import shard_name


@dataclass(frozen=True)
class IdentityBlock:
    """Identities whose reference faces are made and embedded together (before any sample is generated)."""

    index: int
    first_identity: int
    end_identity: int  # exclusive

    @property
    def name(self) -> str:
        return f"identities-{self.index:06d}"

    @property
    def identities(self) -> range:
        return range(self.first_identity, self.end_identity)


@dataclass(frozen=True)
class ShardSlots:
    """One shard: a fixed range of planned sample slots, generated, judged and written by one task."""

    index: int
    name: str  # e.g. "train-000003" (the tar is NAME.tar)
    first_slot: int
    end_slot: int  # exclusive
    samples_per_identity: int

    @property
    def identities(self) -> range:
        """The identities some of whose samples fall in this shard."""
        spi = self.samples_per_identity
        return range(self.first_slot // spi, (self.end_slot - 1) // spi + 1)

    @property
    def planned(self) -> int:
        return self.end_slot - self.first_slot


@dataclass(frozen=True)
class BuildPlan:
    identities: int
    samples_per_identity: int
    identities_per_block: int
    samples_per_shard: int
    split: str = "train"

    @classmethod
    def from_manifest(cls, manifest: BuildManifest) -> "BuildPlan":
        return cls(
            identities=manifest.identities.count,
            samples_per_identity=manifest.identities.samples_per_identity,
            identities_per_block=manifest.resources.identities_per_unit,
            samples_per_shard=manifest.writer.samples_per_shard,
            split=manifest.dataset.split,
        )

    @property
    def total_samples(self) -> int:
        return self.identities * self.samples_per_identity

    @property
    def blocks(self) -> list[IdentityBlock]:
        step = self.identities_per_block
        return [IdentityBlock(i, first, min(first + step, self.identities))
                for i, first in enumerate(range(0, self.identities, step))]

    @property
    def shards(self) -> list[ShardSlots]:
        per, total = self.samples_per_shard, self.total_samples
        return [ShardSlots(k, shard_name(self.split, k).removesuffix(".tar"), first, min(first + per, total),
                           self.samples_per_identity)
                for k, first in enumerate(range(0, total, per))]
