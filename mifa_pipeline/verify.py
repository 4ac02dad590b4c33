"""`mifa verify`: whether a finished data set is exactly what its run manifest says, byte for byte.

Every file (tars, sidecars, scores tables, the identity table) is re-hashed by each digest the manifest
records for it (sha256, md5, BLAKE3) and the index is compared; the fingerprint is recomputed from the
resolved build manifest; counts and per-stage sums are checked against the scores tables; each sidecar row
must agree with its tar member's `.json` and image; a file the manifest does not list is reported. Every
problem is named; an empty list means the data set is whole.
"""

from __future__ import annotations

import json
import tarfile
from collections import Counter
from typing import Any

from mifa_pipeline.card import CARD_FILES
from mifa_pipeline.done import digests_mismatch, file_mismatch
from mifa_pipeline.identity_table import IDENTITIES_FILE
from mifa_pipeline.lock import LOCK_NAME
from mifa_pipeline.manifest import MANIFEST_NAME, SCHEMA_VERSION, read_run_manifest
from mifa_pipeline.records import sample_key
from mifa_pipeline.sample_schema import SAMPLE_SCHEMA_VERSION, validator
from mifa_pipeline.shards import KEY_PATTERN, ShardSample, shard_name, sidecar_row, tar_members
from mifa_pipeline.storage import Location, digest_pieces, location, parquet_from_bytes

DROP_STAGES = ("duplicates", "filter")
COMPANIONS = {"identity_attributes.parquet"}  # written beside a finished data set by `mifa teacher`


def _check_file(folder: Location, entry: dict[str, Any], problems: list[str]) -> bool:
    """Whether the file the manifest entry describes is there, byte for byte; records why not."""
    why = file_mismatch(folder, entry["path"], entry, every_digest=True)
    if why is not None:
        problems.append(why)
    return why is None


def _read_checked(folder: Location, entry: dict[str, Any], problems: list[str]) -> tuple[bytes | None, bool]:
    """(the file's bytes, whether they are what the entry records): each file is read once, then hashed and
    parsed from memory (an object store is not asked for a tar twice)."""
    try:
        data = folder.read_bytes(entry["path"])
    except FileNotFoundError:
        problems.append(f"{entry['path']}: missing")
        return None, False
    why = digests_mismatch(entry["path"], digest_pieces([data]), entry)
    if why is not None:
        problems.append(why)
    return data, why is None


def recomputed_fingerprint(manifest: dict[str, Any]) -> str:
    """The fingerprint the resolved build manifest, recorded models and judges give."""
    from mifa_pipeline.config import BuildManifest
    from mifa_pipeline.manifest import REFILTER_STAGES, chain_fingerprints, model_hash, stage_configs

    m = BuildManifest.model_validate(manifest["build_manifest"])
    judges = manifest.get("judges", {})
    if manifest.get("kind") == "mifa-filter":
        return chain_fingerprints(manifest["parent"]["fingerprint"], stage_configs(m, "", judges), REFILTER_STAGES)[-1]["fingerprint"]
    files = [f for f in manifest["models"] if f["role"] == "generator"]
    configs = stage_configs(m, model_hash(files, m.model.checkpoint), judges)
    return chain_fingerprints("", configs)[-1]["fingerprint"]


def _check_shard(folder: Location, shard: dict[str, Any], planned: range, spi: int, problems: list[str],
                 reasons: Counter, keys_seen: set[str], check_sample, schemas: dict[str, str]) -> int:
    """One shard's tar, sidecar and scores table; returns the number of planned rows found."""
    name = shard["path"]
    data, tar_ok = _read_checked(folder, shard, problems)
    members: dict[str, dict[str, bytes]] = {}
    try:
        members = tar_members(data) if data is not None else {}
    except (tarfile.TarError, OSError) as exc:
        problems.append(f"{name}: not a readable tar ({exc})")
    if tar_ok and len(members) != shard["nsamples"]:
        problems.append(f"{name}: {len(members)} samples, manifest says {shard['nsamples']}")
    for key, exts in members.items():
        if not KEY_PATTERN.match(key):
            problems.append(f"{name}: key {key!r} is not dot-free [A-Za-z0-9_-]+")
        if key in keys_seen:
            problems.append(f"{name}: key {key} appears twice in the data set")
        keys_seen.add(key)
        if not {"json", "cls"} <= set(exts) or not set(exts) & {"png", "jpg", "webp"}:
            problems.append(f"{name}: sample {key} has members {sorted(exts)}, expected image + json + cls")
    data, ok = _read_checked(folder, shard["sidecar"], problems)
    if ok:
        table = parquet_from_bytes(data)
        schemas.setdefault(str(table.schema), shard["sidecar"]["path"])
        rows = table.to_pylist()
        if [r["key"] for r in rows] != list(members):
            problems.append(f"{shard['sidecar']['path']}: keys differ from {name}")
        for row in rows:
            exts = members.get(row["key"])
            if not exts or "json" not in exts:
                continue
            image_ext = row.get("image_ext")
            try:
                meta = json.loads(exts["json"])
                expected = sidecar_row(ShardSample(row["key"], exts.get(image_ext, b""), image_ext,
                                                   meta, int(exts.get("cls", b"-1"))), name)
            except (ValueError, TypeError) as exc:
                problems.append(f"{name}: sample {row['key']}: unreadable .json/.cls ({exc})")
                continue
            if check_sample is not None:
                error = next(iter(check_sample.iter_errors(meta)), None)
                if error is not None:
                    where = "/".join(str(p) for p in error.absolute_path) or "(top)"
                    problems.append(f"{name}: sample {row['key']}: .json {where}: {error.message[:200]} "
                                    f"(schema {check_sample.schema['$id']})")
            differ = sorted(k for k in set(row) | set(expected) if row.get(k) != expected.get(k))
            if differ:
                problems.append(f"{shard['sidecar']['path']}: row {row['key']} disagrees with its tar member in {differ[:5]}")
    found = 0
    data, ok = _read_checked(folder, shard["scores"], problems)
    if ok:
        table = parquet_from_bytes(data, ["key", "keep", "drop_reason"]).to_pylist()
        found = len(table)
        want = [sample_key(slot // spi, slot % spi) for slot in planned]
        if [r["key"] for r in table] != want:
            problems.append(f"{shard['scores']['path']}: rows are not the shard's planned samples {want[0]}..{want[-1]}")
        if [r["key"] for r in table if r["keep"]] != list(members):
            problems.append(f"{shard['scores']['path']}: kept rows differ from {name}")
        reasons.update(r["drop_reason"] for r in table if not r["keep"])
    return found


def verify(where: "Location | str") -> list[str]:
    """Every problem found; an empty list means the data set matches its run manifest byte for byte."""
    folder = location(where)
    manifest = read_run_manifest(folder)
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise ValueError(f"{folder}: a data set of an earlier mifa layout (schema {manifest.get('schema_version')}); "
                         "this version cannot verify it: rebuild it")
    problems: list[str] = []
    try:
        if recomputed_fingerprint(manifest) != manifest["fingerprint"]:
            problems.append("manifest.json: the fingerprint does not follow from its build_manifest, models and judges "
                            "(the run manifest was edited)")
    except Exception as exc:  # noqa: BLE001  (an edited manifest may not even validate)
        problems.append(f"manifest.json: its build_manifest cannot be re-checked ({type(exc).__name__}: {str(exc)[:200]})")
    build = manifest["build_manifest"]
    spi = build["identities"]["samples_per_identity"]
    per = build["writer"]["samples_per_shard"]
    split = manifest["dataset"]["split"]
    counts = manifest["counts"]
    listed = [s["path"] for s in manifest["shards"]]
    n_shards = -(-counts["planned_samples"] // per)
    if listed != [shard_name(split, i) for i in range(n_shards)]:
        problems.append(f"shards: the manifest lists {len(listed)}, the plan has {n_shards} ({split}-000000.tar on)")
    reasons: Counter = Counter()
    keys_seen: set[str] = set()
    planned_found = 0
    check_sample = None  # data sets made before the sample schema (no `sample_schema`) are not held to it
    if manifest.get("sample_schema") == SAMPLE_SCHEMA_VERSION:
        check_sample = validator(list(manifest["au_names"]))
    elif manifest.get("sample_schema") is not None:
        problems.append(f"manifest.json: sample_schema {manifest['sample_schema']}, this mifa knows {SAMPLE_SCHEMA_VERSION}")
    schemas: dict[str, str] = {}
    for i, shard in enumerate(manifest["shards"]):
        slots = range(i * per, min((i + 1) * per, counts["planned_samples"]))
        planned_found += _check_shard(folder, shard, slots, spi, problems, reasons, keys_seen, check_sample, schemas)
    if check_sample is not None and len(schemas) > 1:
        problems.append(f"sidecars: {len(schemas)} different column schemas ({', '.join(schemas.values())}); expected one")
    if manifest.get("identities"):
        _check_file(folder, manifest["identities"], problems)
    else:
        problems.append(f"manifest.json: no record of {IDENTITIES_FILE}")
    index_name = manifest.get("shard_index", "shardindex.json")
    if not folder.isfile(index_name):
        problems.append(f"{index_name}: missing")
    else:
        try:
            index = json.loads(folder.read_text(index_name))
        except ValueError:
            index = {}
        want = [{"url": s["path"], "nsamples": s["nsamples"], "filesize": s["bytes"], "md5sum": s["md5"]}
                for s in manifest["shards"]]
        if index.get("__kind__") != "wids-shard-index-v1" or index.get("shardlist") != want:
            problems.append(f"{index_name}: does not match the run manifest's shards")
    kept = sum(s["nsamples"] for s in manifest["shards"])
    if kept != counts["kept_samples"]:
        problems.append(f"counts: shards hold {kept} samples, manifest counts {counts['kept_samples']}")
    if planned_found != counts["planned_samples"]:
        problems.append(f"counts: scores tables hold {planned_found} planned samples, manifest counts {counts['planned_samples']}")
    stages = manifest["stages"]
    for name, s in stages.items():
        if s["in"] - s["out"] != sum(s["dropped"].values()):
            problems.append(f"stages.{name}: in {s['in']} - out {s['out']} != {sum(s['dropped'].values())} dropped")
    recorded = Counter()
    for name in DROP_STAGES:
        recorded.update(stages.get(name, {}).get("dropped", {}))
    if +recorded != +reasons:
        problems.append(f"stages: drops by reason {dict(recorded)} differ from the scores tables' {dict(reasons)}")
    if stages.get("write", {}).get("out") != kept:
        problems.append(f"stages.write: out {stages.get('write', {}).get('out')} != {kept} samples in the shards")
    expected = {MANIFEST_NAME, index_name, IDENTITIES_FILE, LOCK_NAME, *COMPANIONS, *CARD_FILES}
    for s in manifest["shards"]:
        expected |= {s["path"], s["sidecar"]["path"], s["scores"]["path"]}
    for relative in folder.find():
        if not relative.startswith("_work/") and relative not in expected:
            problems.append(f"{relative}: a file the run manifest does not list")
    return problems
