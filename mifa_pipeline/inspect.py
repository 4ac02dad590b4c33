"""`mifa inspect`: what a build holds (counts, drops, AU and demographic distributions), every score's
percentiles over all planned samples, and what each threshold would drop. `verify.py` checks the build.

The per-sample numbers come from the scores tables (every planned sample, kept or dropped), never from
the images; `report.py` draws the same numbers. A threshold table answers "if filter.X were v, how many
samples would be dropped?" exactly as `mifa filter --set filter.X=v` would decide (`stages.filter.decide`,
all other settings as they are).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from mifa_pipeline.config import FilterSection
from mifa_pipeline.manifest import read_run_manifest
from mifa_pipeline.storage import Location, location
from mifa_pipeline.stages.filter import decide
from mifa_pipeline.stages.write import SCORES_SCHEMA, scores_path

PERCENTILES = (0, 5, 25, 50, 75, 95, 100)
JSON_COLUMNS = ("demographics", "requested", "occurrence_prob", "intensity", "scores")
METADATA = [n for n in SCORES_SCHEMA.names if n != "image"]


@dataclass(frozen=True)
class Threshold:
    """A filter setting that drops samples on one score: `drops` says on which side of the value."""

    score: str
    setting: tuple[str, ...]  # path inside the filter section
    drops: str  # "below" | "above" | "at or above"
    reason: str
    off: float | None = None  # the value that switches the check off (None where the field is optional)

    @property
    def name(self) -> str:
        return "filter." + ".".join(self.setting)


THRESHOLDS = (
    Threshold("pixel_std", ("min_pixel_std",), "below", "blank_image", 0.0),
    Threshold("face_fraction", ("face", "min_fraction"), "below", "face_too_small", 0.0),
    Threshold("identity_cosine", ("identity", "min_cosine"), "below", "identity_mismatch"),
    Threshold("au_agreement", ("au", "min_agreement"), "below", "au_inconsistent"),
    Threshold("au_mae_requested", ("au", "max_label_mae"), "above", "labels_off_request"),
    Threshold("identity_nearest_earlier_cosine", ("identity", "duplicate_cosine"), "at or above", "duplicate_identity"),
)


def shard_names(manifest: dict[str, Any]) -> list[str]:
    return [Path(s["path"]).stem for s in manifest["shards"]]


def sample_rows(where: "Location | str | Path", manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """Every planned sample (kept or dropped) from the scores tables, JSON columns decoded, no image read."""
    folder = location(where)
    rows: list[dict[str, Any]] = []
    for name in shard_names(manifest):
        for row in folder.read_parquet(scores_path(name), columns=METADATA).to_pylist():
            for col in JSON_COLUMNS:
                row[col] = json.loads(row[col])
            row["shard"] = name
            rows.append(row)
    return rows


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)) and math.isfinite(value):
        return float(value)
    return None


def score_percentiles(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Every numeric score (booleans as 0/1) over the samples that have it: n, mean and PERCENTILES."""
    names = list(dict.fromkeys(k for r in rows for k in r["scores"]))
    names.sort(key=lambda n: (n.startswith("au_est_"), n.startswith("au_agree_")))  # per-AU ones last
    out = {}
    for name in names:
        values = np.array([v for r in rows if (v := _number(r["scores"].get(name))) is not None])
        if values.size:
            out[name] = {"n": int(values.size), "mean": float(values.mean()),
                         **{f"p{p}": float(np.percentile(values, p)) for p in PERCENTILES}}
    return out


def current_value(cfg: FilterSection, t: Threshold) -> float | None:
    node: Any = cfg
    for part in t.setting:
        node = getattr(node, part)
    return node


def _with(cfg: FilterSection, t: Threshold, value: float | None) -> FilterSection:
    data = cfg.model_dump()
    node = data
    for part in t.setting[:-1]:
        node = node[part]
    node[t.setting[-1]] = value
    return FilterSection.model_validate(data)


class ThresholdScan:
    """One threshold's effect: per sample its score, whether another check drops it anyway, and whether a
    missing score fails this check; `dropped(v)` counts the samples dropped were the setting `v`."""

    def __init__(self, rows: list[dict[str, Any]], cfg: FilterSection, t: Threshold):
        self.threshold, self.current = t, current_value(cfg, t)
        without = _with(cfg, t, t.off)
        scores = [r["scores"] for r in rows]
        self.values = np.array([np.nan if (v := _number(s.get(t.score))) is None else v for s in scores])
        generated = np.array(["image_valid" in s for s in scores])
        other = [not g or decide(s, without) is not None
                 or (t.reason != "duplicate_identity" and r["drop_reason"] == "duplicate_identity")
                 for g, s, r in zip(generated, scores, rows)]
        self.other = np.array(other, dtype=bool)
        # decide() drops a sample whose identity check ran but found no cosine (no face embedded)
        self.none_fails = np.array([t.score == "identity_cosine" and t.score in s and s[t.score] is None
                                    for s in scores], dtype=bool)
        self.total = len(rows)

    @property
    def present(self) -> bool:
        return bool(np.isfinite(self.values).any())

    def fails(self, value: float) -> np.ndarray:
        with np.errstate(invalid="ignore"):
            if self.threshold.drops == "below":
                return (self.values < value) | self.none_fails
            if self.threshold.drops == "above":
                return self.values > value
            return self.values >= value

    def dropped(self, value: float | None) -> int:
        """Samples dropped with the setting at `value` (None: check off), every other setting as it is."""
        if value is None:
            return int(self.other.sum())
        return int((self.other | self.fails(value)).sum())

    def table_values(self, count: int = 10) -> list[float]:
        """Round values across the observed range, and the current setting."""
        finite = self.values[np.isfinite(self.values)]
        values = set(nice_values(float(finite.min()), float(finite.max()), count))
        if self.current is not None:
            values.add(float(self.current))
        return sorted(values)


def nice_values(lo: float, hi: float, count: int = 10) -> list[float]:
    """About `count` round numbers (steps of 1, 2, 2.5 or 5 x 10^k) covering [lo, hi]."""
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / count
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw)
    first = math.floor(lo / step) * step
    n = int(math.ceil((hi - first) / step - 1e-9)) + 1
    return [round(first + i * step, 10) for i in range(n)]


def threshold_scans(rows: list[dict[str, Any]], manifest: dict[str, Any]) -> dict[str, ThresholdScan]:
    """A scan per thresholded score that the samples carry, keyed by score name."""
    cfg = FilterSection.model_validate(manifest["build_manifest"]["filter"])
    scans = {t.score: ThresholdScan(rows, cfg, t) for t in THRESHOLDS}
    return {name: s for name, s in scans.items() if s.present}


def _fmt(value: float | None) -> str:
    return "off" if value is None else f"{value:.4g}"


def summarise(where: "Location | str | Path", console: Console) -> dict[str, Any]:
    folder = location(where)
    manifest = read_run_manifest(folder)
    rows = sample_rows(folder, manifest)
    kept = [r for r in rows if r["keep"]]
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

    n = max(len(kept), 1)
    au_table = Table(title=f"AUs over {len(kept)} kept samples")
    for col in ("AU", "asked (>=1)", "mean asked", "mean generated", "generated occurrence"):
        au_table.add_column(col, justify="right")
    au_summary = {}
    for au in aus:
        asked = [r["requested"].get(au) or 0 for r in kept]
        gen = [r["intensity"].get(au) or 0.0 for r in kept]
        occ = [int((r["occurrence_prob"].get(au) or 0.0) >= 0.5) for r in kept]
        au_summary[au] = {"asked_rate": sum(a >= 1 for a in asked) / n, "mean_asked": sum(asked) / n,
                          "mean_generated": sum(gen) / n, "occurrence_rate": sum(occ) / n}
        s = au_summary[au]
        au_table.add_row(au, f"{s['asked_rate']:.0%}", f"{s['mean_asked']:.2f}", f"{s['mean_generated']:.2f}",
                         f"{s['occurrence_rate']:.0%}")
    console.print(au_table)

    percentiles = score_percentiles(rows)
    if percentiles:
        table = Table(title=f"scores over all {len(rows)} planned samples (kept and dropped; booleans as 0/1)")
        table.add_column("score")
        for col in ("n", "mean", *(f"p{p}" for p in PERCENTILES)):
            table.add_column(col, justify="right")
        for name, s in percentiles.items():
            table.add_row(name, str(s["n"]), *(f"{s[k]:.4g}" for k in ("mean", *(f"p{p}" for p in PERCENTILES))))
        console.print(table)

    thresholds = {}
    for name, scan in threshold_scans(rows, manifest).items():
        t = scan.threshold
        table = Table(title=f"{t.name} (now {_fmt(scan.current)}): samples dropped if it were ...")
        table.add_column(f"drop {name} {t.drops}", justify="right")
        table.add_column(f"dropped (of {scan.total})", justify="right")
        table.add_column("kept", justify="right")
        table.add_column("")
        entries = {}
        for value in [None, *scan.table_values()]:
            dropped = scan.dropped(value)
            entries[_fmt(value)] = dropped
            mark = "current" if value == scan.current else ""
            table.add_row(_fmt(value), str(dropped), str(scan.total - dropped), mark)
        thresholds[name] = {"setting": t.name, "current": scan.current, "dropped": entries}
        console.print(table)

    demo_keys = sorted({k for r in kept for k in r["demographics"]})
    demographics = {k: Counter(r["demographics"].get(k) for r in kept) for k in demo_keys}
    demographics["expression"] = Counter(r["expression"] for r in kept)
    demo_table = Table(title="demographics and expressions (kept samples)")
    demo_table.add_column("attribute")
    demo_table.add_column("distribution")
    for attr, counts in demographics.items():
        demo_table.add_row(attr, ", ".join(f"{v}: {k}" for v, k in counts.most_common()))
    console.print(demo_table)
    return {"au": au_summary, "scores": percentiles, "thresholds": thresholds,
            "demographics": {k: dict(v) for k, v in demographics.items()}}
