"""The identity table: every identity's reference face, mask and embedding, published as `identities.parquet`.

Identities come first. Identity blocks (reference faces painted, rendered or read, then embedded by the
identity judge) are written by workers under `_work/identities/`; then one pass in global order finds each
identity's nearest *earlier* identity (`duplicates.nearest_earlier`, near-linear) and publishes the table,
with `duplicate` marking those at or above `filter.identity.duplicate_cosine`. Shard tasks read the rows of
their identities from it, and skip the samples of a duplicate: a duplicate identity costs no generation.
`mifa train` and the teacher's attribute file read this table, never `_work/`.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mifa_pipeline.records import IdentityRecord
from mifa_pipeline.shards import encode_image
from mifa_pipeline.storage import Location, discard

IDENTITIES_FILE = "identities.parquet"
BLOCKS_DIR = "_work/identities"
ROW_GROUP = 256  # identities per row group: a shard task reads the groups of its identities only

IDENTITY_SCHEMA = pa.schema([
    ("identity", pa.int64()), ("seed", pa.int64()), ("prompt", pa.string()), ("demographics", pa.string()),
    ("source", pa.string()), ("reference_png", pa.binary()), ("mask_png", pa.binary()),
    ("embedding", pa.list_(pa.float32())), ("nearest_earlier_cosine", pa.float64()), ("duplicate", pa.bool_()),
])
# PNG bytes do not compress: zstd on them cost two thirds of writing a block and most of reading it back
COMPRESSION = {f.name: "none" if f.type == pa.binary() else "zstd" for f in IDENTITY_SCHEMA}


def block_path(name: str) -> str:
    return f"{BLOCKS_DIR}/{name}.parquet"


def write_block(out: Location, name: str, table: pa.Table) -> dict[str, dict[str, Any]]:
    """Identity block `name` written to `out`; {its file: its entry}, for the block's done record."""
    relative = block_path(name)
    return {relative: out.write_parquet(relative, table, COMPRESSION)}


def block_table(people: list[IdentityRecord]) -> pa.Table:
    """An identity block's rows (duplicates not yet known: that needs every earlier identity)."""
    return pa.Table.from_pylist([{
        "identity": p.identity, "seed": p.seed, "prompt": p.prompt,
        "demographics": json.dumps(p.demographics, separators=(",", ":")), "source": p.source,
        "reference_png": encode_image(p.reference, "png"), "mask_png": encode_image(p.mask, "png"),
        "embedding": p.embedding, "nearest_earlier_cosine": None, "duplicate": False,
    } for p in people], schema=IDENTITY_SCHEMA)


def _embedding_matrix(source: Location, parts: list[str]) -> np.ndarray:
    """Every identity's embedding as one float32 matrix (NaN rows where none), taken from Arrow's buffers (no
    Python float per value: a million 512-d embeddings stay seconds)."""
    chunks = [c for part in parts for c in source.read_parquet(part, columns=["embedding"]).column("embedding").chunks]
    embeddings = pa.chunked_array(chunks, type=pa.list_(pa.float32())).combine_chunks()
    valid = embeddings.is_valid().to_numpy(zero_copy_only=False)
    lengths = pc.list_value_length(embeddings).to_numpy(zero_copy_only=False)[valid].astype(np.int64)
    dim = int(lengths[0]) if len(lengths) else 1
    if (lengths != dim).any():
        raise ValueError(f"identity embeddings of several sizes ({sorted(set(lengths.tolist()))}); expected one")
    matrix = np.full((len(embeddings), dim), np.nan, dtype=np.float32)
    if len(lengths):
        matrix[valid] = pc.list_flatten(embeddings.filter(pa.array(valid))).to_numpy().reshape(-1, dim)
    return matrix


def publish(out: Location, source: Location, parts: list[str], duplicate_cosine: float | None) -> dict[str, int]:
    """Stream `parts` (tables in `source`, in global order) into OUT/identities.parquet with nearest-earlier
    cosines and duplicates."""
    from mifa_pipeline.duplicates import nearest_earlier

    nearest = nearest_earlier(_embedding_matrix(source, parts))
    values = [None if math.isnan(v) else round(float(v), 5) for v in nearest]
    duplicate = [duplicate_cosine is not None and v is not None and v >= duplicate_cosine for v in values]
    tmp = out.stage(IDENTITIES_FILE)
    start = 0
    pending: list[pa.Table] = []  # rows not yet written: row groups hold ROW_GROUP rows whatever the block size
    try:
        with pq.ParquetWriter(tmp, IDENTITY_SCHEMA, compression=COMPRESSION) as writer:
            for part in parts:
                table = source.read_parquet(part)
                if not table.schema.equals(IDENTITY_SCHEMA):
                    table = table.cast(IDENTITY_SCHEMA)
                end = start + table.num_rows
                forced = table.column("duplicate").to_pylist()  # a parent's duplicates were never generated
                duplicate[start:end] = [a or bool(b) for a, b in zip(duplicate[start:end], forced)]
                table = table.set_column(8, "nearest_earlier_cosine", pa.array(values[start:end], pa.float64()))
                table = table.set_column(9, "duplicate", pa.array(duplicate[start:end], pa.bool_()))
                pending.append(table)
                start = end
                buffered = pa.concat_tables(pending)
                full = buffered.num_rows // ROW_GROUP * ROW_GROUP
                if full:
                    writer.write_table(buffered.slice(0, full), row_group_size=ROW_GROUP)
                pending = [buffered.slice(full)]
            rest = pa.concat_tables(pending) if pending else None
            if rest is not None and rest.num_rows:
                writer.write_table(rest, row_group_size=ROW_GROUP)
        out.commit(tmp, IDENTITIES_FILE)
    finally:
        discard(tmp)
    return {"identities": start, "duplicates": int(sum(duplicate))}


def read_rows(out: Location, identities: range, columns: list[str] | None = None) -> list[dict[str, Any]]:
    """The table's rows for a contiguous range of identities (only the row groups that hold them are read)."""
    if columns is not None and "identity" not in columns:
        columns = ["identity", *columns]
    with out.parquet_file(IDENTITIES_FILE) as file:
        groups, first = [], 0  # identities are the rows 0..N-1 in order: the groups holding the range, by row counts
        for g in range(file.metadata.num_row_groups):
            n = file.metadata.row_group(g).num_rows
            if first < identities.stop and first + n > identities.start:
                groups.append((g, first))
            first += n
        table = file.read_row_groups([g for g, _ in groups], columns=columns) if groups else None
    start = groups[0][1] if groups else 0
    rows = [] if table is None else table.slice(identities.start - start, len(identities)).to_pylist()
    if [r["identity"] for r in rows] != list(identities):
        raise RuntimeError(f"{out.full_url(IDENTITIES_FILE)}: identities {identities.start}..{identities.stop - 1} are not all there")
    return rows
