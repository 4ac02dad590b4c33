"""Stage 5, shard writing: kept samples, in global (identity, sample) order, into fixed-size shards.

Shard k holds kept samples k*S .. k*S+S-1, so shard contents depend only on the samples, never on
which worker finished first. A shard is recorded in `_work/shards/NAME.json` after its files are
renamed into place; a resumed build recounts a recorded shard's samples without rewriting it and
checks that they are the same ones.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from mifa_pipeline.config import WriterSection
from mifa_pipeline.records import StageStats
from mifa_pipeline.shards import ShardFileWriter, ShardInfo, ShardSample, atomic_write_text, shard_name

ROUND = 5  # decimals of the float labels and scores in .json: stable, readable, far below label noise


def sample_metadata(row: dict[str, Any], dataset: dict[str, str], model: str) -> dict[str, Any]:
    """The `.json` member of a sample, from its pool row."""
    prob = json.loads(row["occurrence_prob"])
    intensity = json.loads(row["intensity"])
    return {
        "key": row["key"],
        "dataset": dataset,
        "identity": row["identity"],
        "sample": row["sample"],
        "seed": row["seed"],
        "model": model,
        "prompt": row["prompt"],
        "expression": row["expression"],
        "demographics": json.loads(row["demographics"]),
        "requested_aus": json.loads(row["requested"]),
        "occurrence_prob": {au: round(p, ROUND) for au, p in prob.items()},
        "occurrence": {au: int(p >= 0.5) for au, p in prob.items()},
        "intensity": {au: round(v, ROUND) for au, v in intensity.items()},
        "intensity_rounded": {au: int(np.rint(v)) for au, v in intensity.items()},
        "scores": json.loads(row["scores"]),
    }


class ShardWriting:
    name = "write"
    version = "1"

    def __init__(self, out: Path, config: WriterSection, split: str, dataset: dict[str, str], model: str,
                 markers: Path):
        self.out = out
        self.config = config
        self.split = split
        self.dataset = dataset
        self.model = model
        self.markers = markers
        self.shards: list[ShardInfo] = []
        self.stats = StageStats(self.name, self.version)
        self._writer: ShardFileWriter | None = None
        self._recorded: ShardInfo | None = None  # the shard being recounted on resume
        self._keys: list[str] = []

    def _marker(self, name: str) -> Path:
        return self.markers / (name + ".json")

    def _written_before(self, index: int) -> bool:
        """Shard `index` was written and recorded by an earlier run (a resume recounts it, never rewrites it)."""
        name = shard_name(self.split, index)
        return self._marker(name).is_file() and (self.out / name).is_file()

    def _open_next(self) -> None:
        name = shard_name(self.split, len(self.shards))
        if self._written_before(len(self.shards)):
            self._recorded = ShardInfo(**json.loads(self._marker(name).read_text()))
        else:
            self._writer = ShardFileWriter(self.out, name)

    def _close_current(self) -> None:
        if self._recorded is not None:
            info = self._recorded
            if (len(self._keys), self._keys[0], self._keys[-1]) != (info.nsamples, info.first_key, info.last_key):
                raise RuntimeError(f"{info.path}: recorded shard does not hold the samples this build puts there; "
                                   "the output folder was changed by hand: rebuild with --fresh")
        else:
            info = self._writer.close()
            atomic_write_text(self._marker(info.path), json.dumps(info.to_json()) + "\n")
        self.shards.append(info)
        self._writer, self._recorded, self._keys = None, None, []

    def already_written(self, n: int) -> bool:
        """Whether the next `n` rows all land in shards an earlier run wrote and recorded (a resume then
        only recounts their keys and need not read their images)."""
        per = self.config.samples_per_shard
        start = len(self.shards) * per + len(self._keys)
        return all(self._written_before(i) for i in range(start // per, (start + max(n, 1) - 1) // per + 1))

    def add(self, rows: list[dict[str, Any]]) -> list[ShardInfo]:
        """Append the next kept rows (already in global order); returns the shards completed by them."""
        start = time.perf_counter()
        done_before = len(self.shards)
        for row in rows:
            if self._writer is None and self._recorded is None:
                self._open_next()
            if self._writer is not None:
                if "image" not in row:
                    raise RuntimeError(f"internal: {row['key']} goes to a new shard but was read without its image")
                self._writer.write(ShardSample(
                    key=row["key"], image=row["image"], image_ext=row["image_ext"],
                    metadata=sample_metadata(row, self.dataset, self.model), label=row["identity"],
                ))
            self._keys.append(row["key"])
            if len(self._keys) == self.config.samples_per_shard:
                self._close_current()
        self.stats.n_in += len(rows)
        self.stats.n_out += len(rows)
        self.stats.seconds += time.perf_counter() - start
        return self.shards[done_before:]

    def finish(self) -> list[ShardInfo]:
        """Close the last, short shard."""
        if self._keys:
            self._close_current()
        return self.shards

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.abort()
