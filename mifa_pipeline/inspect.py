"""`mifa inspect`: what a build holds (counts, drops, AU and demographic distributions). `verify.py` checks it."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
from rich.console import Console
from rich.table import Table

from mifa_pipeline.manifest import read_run_manifest


def _sidecar_rows(folder: Path, manifest: dict[str, Any]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for shard in manifest["shards"]:
        rows += pq.read_table((folder / shard["path"]).with_suffix(".parquet")).to_pylist()
    return rows


def summarise(folder: Path, console: Console) -> dict[str, Any]:
    manifest = read_run_manifest(folder)
    rows = _sidecar_rows(folder, manifest)
    aus = manifest["au_names"]
    ds = manifest["dataset"]
    parent = manifest["parent"]
    parent_text = f"{parent['version']} at {parent['path']}" if parent else "-"
    console.print(f"[bold]{ds['name']}[/] {ds['version']} ({ds['split']}, {manifest['kind']}), "
                  f"fingerprint {manifest['fingerprint'][:12]}, parent {parent_text}")
    c = manifest["counts"]
    console.print(f"{c['identities']} identities, {c['planned_samples']} planned samples, {c['kept_samples']} kept, "
                  f"{len(manifest['shards'])} shard(s); model {manifest['model']}")

    stages = Table(title="stages")
    for col in ("stage", "in", "out", "dropped by reason"):
        stages.add_column(col)
    for name, s in manifest["stages"].items():
        stages.add_row(name, str(s["in"]), str(s["out"]), ", ".join(f"{r}: {n}" for r, n in s["dropped"].items()) or "-")
    console.print(stages)

    n = max(len(rows), 1)
    au_table = Table(title=f"AUs over {len(rows)} kept samples")
    for col in ("AU", "asked (>=1)", "mean asked", "mean generated", "generated occurrence"):
        au_table.add_column(col, justify="right")
    au_summary = {}
    for au in aus:
        asked = [r.get(f"requested_aus_{au}") or 0 for r in rows]
        gen = [r.get(f"intensity_{au}") or 0.0 for r in rows]
        occ = [r.get(f"occurrence_{au}") or 0 for r in rows]
        au_summary[au] = {"asked_rate": sum(a >= 1 for a in asked) / n, "mean_asked": sum(asked) / n,
                          "mean_generated": sum(gen) / n, "occurrence_rate": sum(occ) / n}
        s = au_summary[au]
        au_table.add_row(au, f"{s['asked_rate']:.0%}", f"{s['mean_asked']:.2f}", f"{s['mean_generated']:.2f}",
                         f"{s['occurrence_rate']:.0%}")
    console.print(au_table)

    score_table = Table(title="filter scores (kept samples)")
    for col in ("score", "present", "mean", "min", "max"):
        score_table.add_column(col, justify="right" if col != "score" else "left")
    score_summary = {}
    for col in sorted({k for r in rows for k in r if k.startswith("scores_")}):
        name = col.removeprefix("scores_")
        if name.startswith(("au_est_", "au_agree_")) or name.endswith("_valid"):
            continue  # per-AU columns: see the sidecars; the table keeps the overall numbers
        valid = f"{col}_valid"  # a score not computed is 0 with its flag false (sample_schema.py); older: None
        values = [float(r[col]) for r in rows if isinstance(r.get(col), (int, float)) and r.get(valid, True)]
        if values:
            score_summary[name] = {"n": len(values), "mean": sum(values) / len(values), "min": min(values), "max": max(values)}
            s = score_summary[name]
            score_table.add_row(name, str(s["n"]), f"{s['mean']:.3f}", f"{s['min']:.3f}", f"{s['max']:.3f}")
    if score_summary:
        console.print(score_table)

    demo_cols = sorted({k for r in rows for k in r if k.startswith("demographics_")})
    demographics = {col.removeprefix("demographics_"): Counter(r[col] for r in rows) for col in demo_cols}
    demographics["expression"] = Counter(r.get("expression") for r in rows)
    demo_table = Table(title="demographics and expressions (kept samples)")
    demo_table.add_column("attribute")
    demo_table.add_column("distribution")
    for attr, counts in demographics.items():
        demo_table.add_row(attr, ", ".join(f"{v}: {k}" for v, k in counts.most_common()))
    console.print(demo_table)
    return {"au": au_summary, "scores": score_summary, "demographics": {k: dict(v) for k, v in demographics.items()}}
