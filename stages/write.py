"""Stage 5, shard writing: one shard's files, from the rows of its planned samples (kept and dropped).

A shard task ends here. It writes, each atomically:
- `NAME.tar`: the kept samples (KEY.png, KEY.json, KEY.cls), what training streams;
- `NAME.parquet`: the sidecar, one row per kept sample (labels, scores, image sha256), what readers query;
- `scores/NAME.parquet`: every planned sample of the shard, kept or dropped, with its scores, decision and
  drop reason, and the encoded image of each dropped one (kept images live in the tar). `mifa filter`
  re-decides from this table alone; it is kept apart so a reader of the sidecars never meets a dropped row.
Rows are plain dicts (`SCORES_SCHEMA`), so a re-filter, which reads rows back, writes through the same code.
"""

from __future__ import annotations

import json
import time
from typing import Any

import pyarrow as pa
import pydantic_core

from mifa_pipeline.records import IdentityRecord, SampleRecord, StageStats
from mifa_pipeline.sample_schema import public_scores
from mifa_pipeline.shards import ShardFileWriter, ShardSample, sidecar_row
from mifa_pipeline.storage import Location

ROUND = 5  # decimals of the float labels and scores in .json: stable, readable, far below label noise
SCORES_DIR = "scores"

SCORES_SCHEMA = pa.schema([
    ("key", pa.string()), ("identity", pa.int64()), ("sample", pa.int64()), ("seed", pa.int64()),
    ("expression", pa.string()), ("prompt", pa.string()), ("demographics", pa.string()),
    ("requested", pa.string()), ("occurrence_prob", pa.string()), ("intensity", pa.string()),
    ("scores", pa.string()), ("keep", pa.bool_()), ("drop_reason", pa.string()),
    ("image", pa.binary()), ("image_ext", pa.string()),
])  # JSON-valued columns keep the AU order of the build; `image` is null for kept and never-generated samples


def compact_json(value: Any) -> str:
    """Compact JSON (pydantic-core's encoder: a third of `json.dumps`'s time; NaN stays `NaN`, as there)."""
    return pydantic_core.to_json(value, inf_nan_mode="constants").decode("utf-8")


parse_json = pydantic_core.from_json  # twice as fast as json.loads on these short strings; the same values


def sample_row(sample: SampleRecord, person: IdentityRecord, image_ext: str) -> dict[str, Any]:
    """A sample's scores-table row (the form a shard's samples take from here on)."""
    return {
        "key": sample.key, "identity": sample.identity, "sample": sample.sample, "seed": sample.seed,
        "expression": sample.expression, "prompt": sample.prompt, "demographics": compact_json(person.demographics),
        "requested": compact_json(sample.requested), "occurrence_prob": compact_json(sample.occurrence_prob),
        "intensity": compact_json(sample.intensity), "scores": compact_json(sample.scores), "keep": sample.keep,
        "drop_reason": sample.drop_reason, "image": sample.image_bytes, "image_ext": image_ext,
    }


def sample_metadata(row: dict[str, Any], dataset: dict[str, str], model: str) -> dict[str, Any]:
    """The `.json` member of a sample, from its row: a pure function of the row (a re-filter that keeps a
    sample copies these bytes), in the published schema (`sample_schema`: one type per field, no null)."""
    requested = parse_json(row["requested"])
    prob = parse_json(row["occurrence_prob"])
    intensity = parse_json(row["intensity"])
    return {
        "key": row["key"],
        "dataset": dataset,
        "identity": int(row["identity"]),
        "sample": int(row["sample"]),
        "seed": int(row["seed"]),
        "model": model,
        "prompt": row["prompt"],
        "expression": row["expression"],
        "demographics": {k: str(v) for k, v in parse_json(row["demographics"]).items()},
        "requested_aus": {au: int(v) for au, v in requested.items()},
        "occurrence_prob": {au: round(float(p), ROUND) for au, p in prob.items()},
        "occurrence": {au: int(p >= 0.5) for au, p in prob.items()},
        "intensity": {au: round(float(v), ROUND) for au, v in intensity.items()},
        "intensity_rounded": {au: round(float(v)) for au, v in intensity.items()},  # half to even, as np.rint
        "scores": public_scores(parse_json(row["scores"]), list(requested)),
    }


_ARROW_TYPES = {bool: pa.bool_(), int: pa.int64(), float: pa.float64(), str: pa.string()}


def sidecar_schema(row: dict[str, Any], dataset: dict[str, str], model: str, shard: str) -> pa.Schema:
    """The sidecar's Arrow schema, from any planned row of the shard (kept or not: the AU order and the
    demographic keys are the data set's): the same columns and types in every sidecar, an empty one too."""
    aus = list(json.loads(row["requested"]))
    template = {**row, "requested": json.dumps({au: 0 for au in aus}),
                "occurrence_prob": json.dumps({au: 0.0 for au in aus}), "intensity": json.dumps({au: 0.0 for au in aus}),
                "scores": "{}"}
    meta = sample_metadata(template, dataset, model)
    flat = sidecar_row(ShardSample(key=row["key"], image=b"", image_ext="png", metadata=meta, label=0), shard)
    return pa.schema([pa.field(name, _ARROW_TYPES[type(value)], nullable=False) for name, value in flat.items()])


def scores_path(name: str) -> str:
    return f"{SCORES_DIR}/{name}.parquet"


def shard_files(name: str) -> list[str]:
    """A shard's files, in the order its done record lists them."""
    return [f"{name}.tar", f"{name}.parquet", scores_path(name)]


class ShardWriting:
    name = "write"
    version = "4"  # 3: the published sample schema (sample_schema.py); 4: JSON by pydantic-core (0.00001, not 1e-05)

    def __init__(self, out: Location, dataset: dict[str, str], model: str):
        self.out = out
        self.dataset = dataset
        self.model = model

    def run(self, name: str, rows: list[dict[str, Any]],
            copies: dict[str, tuple[bytes, dict[str, Any]]] | None = None
            ) -> tuple[dict[str, Any], dict[str, dict[str, Any]], StageStats]:
        """Write shard `name` from its rows in slot order; returns what it holds (nsamples, first and last
        key: for its done record), its files with the digests of the bytes written (the done record's entries,
        so nothing is read back), its stats.

        `copies` (a re-filter's): key -> (the raw tar bytes and the sidecar row another shard holds for a kept
        sample whose members are unchanged); those samples are copied as they are, nothing re-encoded."""
        start = time.perf_counter()
        kept = [r for r in rows if r["keep"]]
        copies = copies or {}
        schema = sidecar_schema(rows[0], self.dataset, self.model, f"{name}.tar") if rows else None
        writer = ShardFileWriter(self.out, f"{name}.tar", schema)
        try:
            for row in kept:
                if row["key"] in copies:
                    writer.copy(row["key"], *copies[row["key"]])
                    continue
                writer.write(ShardSample(key=row["key"], image=row["image"], image_ext=row["image_ext"],
                                         metadata=sample_metadata(row, self.dataset, self.model), label=row["identity"]))
            written = writer.close()
        except BaseException:
            writer.abort()
            raise
        table = pa.Table.from_pylist([{**r, "image": None if r["keep"] else r["image"]} for r in rows],
                                     schema=SCORES_SCHEMA)
        written[scores_path(name)] = self.out.write_parquet(scores_path(name), table)
        stats = StageStats(self.name, self.version, n_in=len(kept), n_out=len(kept),
                           seconds=time.perf_counter() - start)
        keys = writer.keys
        contents = {"nsamples": len(keys), "first_key": keys[0] if keys else None, "last_key": keys[-1] if keys else None}
        files = {f: written[f] for f in shard_files(name)}
        return contents, files, stats
