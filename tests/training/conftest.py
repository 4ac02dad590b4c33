"""Tiny teacher data sets in the build's shard format, written directly (shards, manifest, identity table)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mifa_pipeline.aus import DISFA12, describe_aus
from mifa_pipeline.stages.teacher import identity_params, write_identity_attributes
from mifa_pipeline.shards import ShardFileWriter, ShardSample, encode_image
from mifa_pipeline.teacher import render_face
from mifa_pipeline.training.data import ellipse_mask


def write_teacher_data(folder: Path, identities: int, per_identity: int, size: int = 32, seed: int = 0,
                       attributes: bool = False) -> Path:
    """``attributes``: also ``identity_attributes.parquet`` (each identity's face-shape parameters)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    writer = ShardFileWriter(folder, "train-000000.tar")
    rows = {"identity": [], "seed": [], "prompt": [], "reference_png": [], "mask_png": []}
    mask = ellipse_mask(size)
    demographics = {"skin": "light skin"}
    for i in range(identities):
        params = identity_params(seed * 1000 + i)
        who = "a person with light skin, brown eyes and short black hair, wearing a blue top"
        rows["identity"].append(i)
        rows["seed"].append(seed * 1000 + i)
        rows["prompt"].append(f"a close-up portrait photo of {who}, neutral expression, looking at the camera")
        rows["reference_png"].append(encode_image(render_face(params, {}, size=size).image, "png"))
        rows["mask_png"].append(encode_image(mask, "png"))
        for j in range(per_identity):
            chosen = rng.choice(len(DISFA12), size=2, replace=False)
            aus = {au: 0 for au in DISFA12}
            for c in chosen:
                aus[DISFA12[c]] = int(rng.integers(1, 6))
            words = describe_aus({a: v for a, v in aus.items() if v}) or "a neutral expression"
            meta = {
                "key": f"id{i:07d}-s{j:04d}", "identity": i, "sample": j,
                "prompt": f"a close-up portrait photo of <ID> <ID2>, {who}, the face shows {words}",
                "requested_aus": aus, "intensity": {a: float(v) for a, v in aus.items()},
                "occurrence": {a: int(v >= 1) for a, v in aus.items()}, "demographics": demographics,
            }
            image = render_face(params, aus, size=size).image
            writer.write(ShardSample(meta["key"], encode_image(image, "png"), "png", meta, i))
    writer.close()
    (folder / "manifest.json").write_text(json.dumps({"au_names": list(DISFA12)}))
    # the identity table a build publishes beside its shards (every column; no judge ran, nothing duplicate)
    n = len(rows["identity"])
    pq.write_table(pa.table({
        "identity": pa.array(rows["identity"], pa.int64()), "seed": pa.array(rows["seed"], pa.int64()),
        "prompt": pa.array(rows["prompt"], pa.string()),
        "demographics": pa.array([json.dumps(demographics, sort_keys=True)] * n, pa.string()),
        "source": pa.array(["teacher"] * n, pa.string()),
        "reference_png": pa.array(rows["reference_png"], pa.binary()),
        "mask_png": pa.array(rows["mask_png"], pa.binary()),
        "embedding": pa.array([None] * n, pa.list_(pa.float32())),
        "nearest_earlier_cosine": pa.array([None] * n, pa.float64()),
        "duplicate": pa.array([False] * n, pa.bool_()),
    }), folder / "identities.parquet")
    if attributes:
        write_identity_attributes(folder)
    return folder


@pytest.fixture(scope="session")
def teacher_data(tmp_path_factory) -> Path:
    """6 identities x 3 samples at 32 px (the tiny config's smallest resolution)."""
    return write_teacher_data(tmp_path_factory.mktemp("teacher") / "data", identities=6, per_identity=3, size=32)
