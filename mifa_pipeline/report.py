"""`mifa report`: one self-contained HTML page about a build or filter version, for curators.

It reads the run manifest, the scores tables (every planned sample's scores and decision, via `inspect.py`)
and the identity table, and only the images it shows: kept ones from their shard's tar (that sample's
members alone), dropped ones from the scores tables, reference faces from `identities.parquet`. Pictures
and plots (matplotlib, `report_plots.py`) are inlined as data URIs and the page has no script and no
external resource, so it opens from disk anywhere. Selections are fixed by the data (identity and sample
order), so the same data set gives the same page.
"""

from __future__ import annotations

import base64
import html
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from mifa_pipeline import report_plots as plots
from mifa_pipeline.identity_table import IDENTITIES_FILE
from mifa_pipeline.inspect import THRESHOLDS, ThresholdScan, sample_rows, threshold_scans
from mifa_pipeline.manifest import read_run_manifest
from mifa_pipeline.shards import atomic_write_text, tar_members
from mifa_pipeline.storage import Location, location
from mifa_pipeline.stages.filter import REQUESTED_PRESENT
from mifa_pipeline.stages.write import scores_path

MAX_IDENTITIES = 6  # rows of the identity grid
MAX_PER_IDENTITY = 8  # samples shown per identity
MAX_PER_EXPRESSION = 8
MAX_PER_REASON = 4  # dropped samples shown (each beside a kept one) per drop reason
NEAREST_OTHER_LIMIT = 20000  # identities up to which the nearest other identity is searched exactly
MIME = {"png": "image/png", "jpg": "image/jpeg", "webp": "image/webp"}
SECTIONS = {
    "overview": "Overview", "identities": "Samples per identity", "expressions": "Samples per expression",
    "kept-dropped": "Kept and dropped", "au-histograms": "AU intensities", "au-agreement": "AU agreement",
    "demographics": "Demographic balance", "identity-similarity": "Identity similarity",
    "drop-reasons": "Drop reasons", "thresholds": "Thresholds", "lineage": "Version lineage",
}


class ReportError(ValueError):
    """A location that cannot be reported on, or an output it must not write."""


def default_output(folder: Location) -> Path:
    """Beside a local data set, never inside it (`mifa verify` names any file the run manifest does not list);
    in the current folder for one in object storage."""
    if folder.is_local:
        return folder.local().parent / f"{folder.name}-report.html"
    return Path.cwd() / f"{folder.name}-report.html"


def write_report(where: "Location | str | Path", out: Path | None = None) -> Path:
    folder = location(where)
    target = Path(out) if out is not None else default_output(folder)
    manifest = read_run_manifest(folder)
    if folder.is_local and target.resolve().is_relative_to(folder.local().resolve()):
        raise ReportError(f"--out {target}: inside the data set {folder}, which would then hold a file its run "
                          "manifest does not list; write it elsewhere")
    page = render(folder, manifest)
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(target, page)
    return target


# ------------------------------------------------------------------------------------------------ data
def _uri(data: bytes, ext: str) -> str:
    return f"data:{MIME.get(ext, 'application/octet-stream')};base64,{base64.b64encode(data).decode('ascii')}"


def _load_images(folder: Location, shown: list[dict[str, Any]]) -> dict[str, str]:
    """key -> data URI of the samples shown: kept ones from their tar, dropped ones from the scores table."""
    images: dict[str, str] = {}
    by_shard: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for row in shown:
        by_shard.setdefault(row["shard"], {"kept": [], "dropped": []})["kept" if row["keep"] else "dropped"].append(row)
    for shard, parts in sorted(by_shard.items()):
        if parts["kept"]:
            members = tar_members(folder.read_bytes(f"{shard}.tar"), {r["key"] for r in parts["kept"]})
            for r in parts["kept"]:
                images[r["key"]] = _uri(members[r["key"]][r["image_ext"]], r["image_ext"])
        wanted = [r["key"] for r in parts["dropped"]]
        if wanted:
            table = folder.read_parquet(scores_path(shard), columns=["key", "image", "image_ext"],
                                  filters=[("key", "in", wanted)])
            for key, data, ext in zip(*(table.column(c).to_pylist() for c in ("key", "image", "image_ext"))):
                if data is not None:
                    images[key] = _uri(data, ext)
    return images


def _references(folder: Location, identities: set[int]) -> dict[int, str]:
    if not identities:
        return {}
    table = folder.read_parquet(IDENTITIES_FILE, columns=["identity", "reference_png"],
                          filters=[("identity", "in", sorted(identities))])
    return {i: _uri(png, "png") for i, png in zip(table.column("identity").to_pylist(),
                                                   table.column("reference_png").to_pylist())}


def _nearest_other(folder: Location) -> tuple[list[float], str]:
    """Each identity's reference vs its most similar other identity (cosine of the stored embeddings)."""
    table = folder.read_parquet(IDENTITIES_FILE, columns=["embedding", "nearest_earlier_cosine"])
    if table.num_rows > NEAREST_OTHER_LIMIT:
        values = [v for v in table.column("nearest_earlier_cosine").to_pylist() if v is not None]
        return values, "nearest earlier identity"
    rows = [(i, e) for i, e in enumerate(table.column("embedding").to_pylist()) if e is not None]
    if len(rows) < 2:
        return [], "nearest other identity"
    matrix = np.array([e for _, e in rows], dtype=np.float32)
    matrix /= np.maximum(np.linalg.norm(matrix, axis=1, keepdims=True), 1e-12)
    best = []
    for start in range(0, len(matrix), 1024):
        block = matrix[start:start + 1024] @ matrix.T
        for i in range(block.shape[0]):
            block[i, start + i] = -np.inf
        best.extend(float(v) for v in block.max(axis=1))
    return best, "nearest other identity"


def _estimate(row: dict[str, Any], au: str) -> float | None:
    return row["scores"].get(f"au_est_{au}")


# ----------------------------------------------------------------------------------------------- pieces
def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _drop_note(row: dict[str, Any], settings: dict[str, tuple[Any, str]]) -> str:
    """The drop reason, with the score and setting that made it where there is one."""
    reason = row["drop_reason"]
    for t in THRESHOLDS:
        if t.reason == reason and t.score in row["scores"]:
            value, sign = settings[t.score]
            score = row["scores"][t.score]
            shown = "none" if score is None else f"{score:.3g}"
            return f"{reason}: {t.score} {shown} {sign} {value:g}" if value is not None else reason
    return reason or ""


def _card(row: dict[str, Any], image: str | None, aus: list[str], present: float,
          settings: dict[str, tuple[Any, str]]) -> str:
    status = "kept" if row["keep"] else "dropped"
    label = "kept" if row["keep"] else _drop_note(row, settings)
    lines = []
    for au in aus:
        req, gen, est = row["requested"].get(au, 0), row["intensity"].get(au, 0.0), _estimate(row, au)
        if req or gen >= 0.5 or (est is not None and est >= present):
            est_text = "-" if est is None else f"{est:.2f}"
            lines.append(f"<tr><td>{au}</td><td>{req}</td><td>{gen:.1f}</td><td>{est_text}</td></tr>")
    table = ("<table class='aus'><tr><th>AU</th><th>req</th><th>gen</th><th>est</th></tr>" + "".join(lines)
             + "</table>") if lines else "<p class='none'>no AU asked, generated or estimated (neutral)</p>"
    picture = (f"<img src='{image}' alt='{_esc(row['key'])}' width='120' height='120'>" if image
               else "<div class='noimg'>not generated</div>")
    return (f"<figure class='card {status}' title='{_esc(row['prompt'])}'>{picture}<figcaption>"
            f"<b>{_esc(row['key'])}</b> <span class='badge {status}'>{_esc(label)}</span>"
            f"<br><span class='expr'>{_esc(row['expression'])}</span>{table}</figcaption></figure>")


def _reference_card(identity: int, image: str | None, note: str = "") -> str:
    picture = f"<img src='{image}' alt='identity {identity} reference' width='120' height='120'>" if image else ""
    return (f"<figure class='card reference'>{picture}<figcaption><b>identity {identity}</b> "
            f"<span class='badge reference'>reference{_esc(note)}</span></figcaption></figure>")


def _plot(png: bytes, alt: str) -> str:
    return f"<img class='plot' src='{_uri(png, 'png')}' alt='{_esc(alt)}'>"


def _table(head: list[str], rows: list[list[Any]]) -> str:
    cells = "".join("<tr>" + "".join(f"<td>{_esc(c)}</td>" for c in r) + "</tr>" for r in rows)
    return "<table class='data'><tr>" + "".join(f"<th>{_esc(h)}</th>" for h in head) + "</tr>" + cells + "</table>"


def _flatten(value: Any, prefix: str, out: dict[str, Any]) -> dict[str, Any]:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(v, f"{prefix}.{k}" if prefix else k, out)
    else:
        out[prefix] = value
    return out


def _lineage(folder: Location, manifest: dict[str, Any]) -> list[list[Any]]:
    """This version and its ancestors (newest first), with the filter settings each changed."""
    rows, current, where, seen = [], manifest, folder, set()
    while current is not None and current["fingerprint"] not in seen:
        seen.add(current["fingerprint"])
        parent, parent_manifest = current.get("parent"), None
        if parent:
            try:
                parent_manifest = read_run_manifest(location(parent["path"], folder.storage_options))
            except (OSError, ValueError):
                parent_manifest = None
        changed = "-"
        if parent_manifest is not None:
            new = _flatten(current["build_manifest"]["filter"], "filter", {})
            old = _flatten(parent_manifest["build_manifest"]["filter"], "filter", {})
            changed = "; ".join(f"{k}: {old.get(k)} -> {new.get(k)}" for k in sorted(new) if new.get(k) != old.get(k)) or "-"
        elif parent:
            changed = f"(parent {parent['version']} not found at {parent['path']})"
        c = current["counts"]
        rows.append([f"{current['dataset']['name']} {current['dataset']['version']}", current["kind"],
                     current.get("finished", "-"), f"{c['kept_samples']} / {c['planned_samples']}",
                     current["fingerprint"][:12], str(where), changed])
        current = parent_manifest
        where = parent["path"] if parent else where
    return rows


# ------------------------------------------------------------------------------------------------ page
def _choose(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Which samples the grids show, fixed by identity and sample order."""
    by_identity: dict[int, list[dict[str, Any]]] = {}
    for r in rows:
        by_identity.setdefault(r["identity"], []).append(r)
    mixed = sorted(by_identity, key=lambda i: (not (any(r["keep"] for r in by_identity[i])
                                                     and any(not r["keep"] for r in by_identity[i])), i))
    identities = sorted(mixed[:MAX_IDENTITIES])
    expressions: dict[str, list[dict[str, Any]]] = {}
    counts = Counter(r["expression"] for r in rows)
    for expression in sorted(counts, key=lambda e: (-counts[e], e)):
        seen, picked = set(), []
        for r in rows:
            if r["expression"] == expression and r["identity"] not in seen and len(picked) < MAX_PER_EXPRESSION:
                seen.add(r["identity"])
                picked.append(r)
        expressions[expression] = picked
    pairs: dict[str, list[tuple[dict[str, Any], dict[str, Any] | None]]] = {}
    reasons = Counter(r["drop_reason"] for r in rows if not r["keep"])
    for reason in sorted(reasons, key=lambda x: (-reasons[x], x)):
        for r in [r for r in rows if r["drop_reason"] == reason][:MAX_PER_REASON]:
            kept = [k for k in by_identity[r["identity"]] if k["keep"]]
            match = next((k for k in kept if k["expression"] == r["expression"]), kept[0] if kept else None)
            pairs.setdefault(reason, []).append((r, match))
    return {"identities": {i: by_identity[i][:MAX_PER_IDENTITY] for i in identities},
            "expressions": expressions, "pairs": pairs}


CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0 1em 3em;color:#222;max-width:1500px}
header{border-bottom:1px solid #ccc;padding:1em 0} h1{margin:.2em 0} h2{margin-top:1.6em;border-bottom:1px solid #eee}
nav a{margin-right:1em;font-size:.9em} .muted{color:#666;font-size:.9em}
.grid{display:flex;flex-wrap:wrap;gap:6px;align-items:flex-start} .row{margin:.6em 0}
.card{margin:0;width:132px;box-sizing:border-box;border:3px solid #ddd;border-radius:4px;padding:3px;font-size:11px;background:#fff}
.card.kept{border-color:#55a868} .card.dropped{border-color:#c44e52} .card.reference{border-color:#8172b3}
.card img{width:120px;height:120px;display:block;margin:auto;object-fit:contain;background:#f4f4f4}
.badge{display:inline-block;padding:0 4px;border-radius:3px;color:#fff;font-size:10px}
.badge.kept{background:#55a868} .badge.dropped{background:#c44e52} .badge.reference{background:#8172b3}
.expr{color:#555} .none{color:#777;margin:.2em 0}
.noimg{width:120px;height:120px;display:flex;align-items:center;justify-content:center;background:#f4f4f4;color:#888}
table.aus{border-collapse:collapse;margin-top:2px;width:100%} table.aus td,table.aus th{padding:0 2px;text-align:right}
table.data{border-collapse:collapse;font-size:13px;margin:.5em 0}
table.data td,table.data th{border:1px solid #ddd;padding:2px 8px;text-align:left;vertical-align:top}
.pair{display:flex;gap:4px;border:1px dashed #bbb;padding:4px;border-radius:4px}
img.plot{max-width:100%;display:block;margin:.5em 0}
"""


def render(where: "Location | str | Path", manifest: dict[str, Any] | None = None) -> str:
    """The whole page, as a string."""
    folder = location(where)
    manifest = manifest or read_run_manifest(folder)
    rows = sample_rows(folder, manifest)
    kept = [r for r in rows if r["keep"]]
    aus = manifest["au_names"]
    cfg = manifest["build_manifest"]["filter"]
    present = cfg["au"]["present_threshold"]
    scans = threshold_scans(rows, manifest)
    settings = {t.score: (scans[t.score].current if t.score in scans else None,
                          {"below": "<", "above": ">", "at or above": ">="}[t.drops]) for t in THRESHOLDS}
    chosen = _choose(rows)
    shown = [r for group in chosen["identities"].values() for r in group]
    shown += [r for group in chosen["expressions"].values() for r in group]
    shown += [r for pairs in chosen["pairs"].values() for pair in pairs for r in pair if r is not None]
    unique = list({r["key"]: r for r in shown}.values())
    images = _load_images(folder, unique)
    references = _references(folder, set(chosen["identities"]) | {
        r["identity"] for pairs in chosen["pairs"].values() for r, _ in pairs if r["key"] not in images})

    def card(r: dict[str, Any]) -> str:
        return _card(r, images.get(r["key"]), aus, present, settings)

    ds, c = manifest["dataset"], manifest["counts"]
    title = f"{ds['name']} {ds['version']}"
    parts = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{_esc(title)} report</title>"
             f"<style>{CSS}</style></head><body><header><h1>{_esc(title)}</h1>"
             f"<p>{_esc(manifest['kind'])} &middot; {c['identities']} identities &middot; {c['planned_samples']} "
             f"planned samples &middot; <b>{c['kept_samples']} kept</b> &middot; {len(manifest['shards'])} shard(s) "
             f"&middot; model {_esc(manifest['model'])} &middot; fingerprint {_esc(manifest['fingerprint'][:12])} "
             f"&middot; finished {_esc(manifest.get('finished', '-'))}</p><p class='muted'>{_esc(folder)}. Read from "
             f"the scores tables ({len(rows)} rows) and {len(images) + len(references)} images; AUs under each "
             f"picture: <b>req</b> requested by the prompt (FACS 0-5), <b>gen</b> generated label (0-5), <b>est</b> "
             f"the independent estimate (0-1 proxy, shown at &ge; {present:g}).</p><nav>"
             + "".join(f"<a href='#{k}'>{_esc(v)}</a>" for k, v in SECTIONS.items()) + "</nav></header>"]

    def section(key: str, body: str, note: str = "") -> None:
        note_html = f"<p class='muted'>{note}</p>" if note else ""
        parts.append(f"<section id='{key}'><h2>{_esc(SECTIONS[key])}</h2>{note_html}{body}</section>")

    stage_rows = [[n, s["in"], s["out"], ", ".join(f"{r}: {k}" for r, k in s["dropped"].items()) or "-"]
                  for n, s in manifest["stages"].items()]
    section("overview", _table(["stage", "in", "out", "dropped by reason"], stage_rows))

    body = "".join(f"<div class='row grid'>{_reference_card(i, references.get(i))}{''.join(card(r) for r in group)}</div>"
                   for i, group in chosen["identities"].items())
    section("identities", body, f"{len(chosen['identities'])} of {c['identities']} identities (those with kept and "
            f"dropped samples first), each with its reference face and up to {MAX_PER_IDENTITY} samples. Green: kept, "
            "red: dropped (reason under the picture).")

    body = "".join(f"<h3>{_esc(e)} ({sum(r['expression'] == e for r in rows)} samples)</h3>"
                   f"<div class='grid'>{''.join(card(r) for r in group)}</div>"
                   for e, group in chosen["expressions"].items())
    section("expressions", body, f"Up to {MAX_PER_EXPRESSION} samples per expression kind, one per identity.")

    body = "".join(f"<h3>{_esc(reason)}</h3><div class='grid'>" + "".join(
        "<div class='pair'>" + card(d) + (card(k) if k is not None else "")
        + (_reference_card(d["identity"], references.get(d["identity"])) if d["key"] not in images else "") + "</div>"
        for d, k in pairs) + "</div>" for reason, pairs in chosen["pairs"].items())
    section("kept-dropped", body or "<p>No sample was dropped.</p>",
            f"Per drop reason, up to {MAX_PER_REASON} dropped samples, each beside a kept sample of the same identity "
            "(same expression where there is one).")

    generated = [r for r in rows if "image_valid" in r["scores"]]
    body = _plot(plots.au_histograms(
        aus, {au: [r["requested"].get(au, 0) for r in kept] for au in aus},
        {au: [r["intensity"].get(au, 0.0) for r in kept] for au in aus},
        {au: [v for r in kept if (v := _estimate(r, au)) is not None] for au in aus}), "AU intensity histograms")
    section("au-histograms", body, f"Over the {len(kept)} kept samples. The estimate is a 0-1 proxy drawn x5 on "
            "the same axis; samples with the AU at rest (below 0.25) are counted in each title, not drawn.")

    rates, table_rows = {}, []
    for au in aus:
        with_est = [r for r in kept if _estimate(r, au) is not None and r["scores"].get("face_count")]
        request = [r["scores"][f"au_agree_{au}"] for r in with_est if r["scores"].get(f"au_agree_{au}") is not None]
        labels = [int((_estimate(r, au) >= present) == (r["occurrence_prob"].get(au, 0.0) >= 0.5)) for r in with_est]
        close = [int(abs(r["intensity"].get(au, 0.0) - r["requested"].get(au, 0)) < 1) for r in kept]
        rates[au] = {"request vs estimate": float(np.mean(request)) if request else None,
                     "labels vs estimate": float(np.mean(labels)) if labels else None,
                     "generated within 1 of requested": float(np.mean(close)) if close else None}
        table_rows.append([au, len(with_est), *("-" if v is None else f"{v:.0%}" for v in rates[au].values())])
    body = _plot(plots.au_agreement(aus, rates), "AU agreement per AU") + _table(
        ["AU", "samples with an estimate", *next(iter(rates.values()))], table_rows)
    section("au-agreement", body, f"Over the kept samples. The estimate shows an AU at &ge; {present:g}; the prompt "
            f"asks for it at intensity &ge; {REQUESTED_PRESENT}; MAUGen's label at occurrence p &ge; 0.5.")

    attributes = sorted({k for r in rows for k in r["demographics"]})
    asked = {a: Counter(r["demographics"].get(a) for r in rows) for a in attributes}
    asked["expression"] = Counter(r["expression"] for r in rows)
    held = {a: Counter(r["demographics"].get(a) for r in kept) for a in attributes}
    held["expression"] = Counter(r["expression"] for r in kept)
    section("demographics", _plot(plots.demographics(asked, held), "demographics asked vs kept"),
            f"Share of each value among the {len(rows)} planned samples (asked) and the {len(kept)} kept ones.")

    same = [v for r in generated if (v := r["scores"].get("identity_cosine")) is not None]
    other, label = _nearest_other(folder)
    if same or other:
        body = _plot(plots.identity_similarity(same, other, cfg["identity"]["min_cosine"],
                                               cfg["identity"]["duplicate_cosine"], label), "identity similarity")
    else:
        body = "<p>No identity embedder ran in this build (filter.identity.embedder: none).</p>"
    section("identity-similarity", body, "Same identity: each generated face vs its identity's reference "
            f"(all {len(generated)} generated samples, kept and dropped). {label.capitalize()}: each reference face vs "
            "the most similar other reference.")

    reasons = Counter(r["drop_reason"] for r in rows if not r["keep"])
    body = (_plot(plots.drop_reasons(dict(reasons)), "drop reasons")
            + _table(["reason", "samples", "share of planned"],
                     [[k, n, f"{n / len(rows):.1%}"] for k, n in reasons.most_common()])) if reasons else "<p>None.</p>"
    section("drop-reasons", body, f"{sum(reasons.values())} of {len(rows)} planned samples dropped.")

    curves = [_curve(scan) for scan in scans.values()]
    body = _plot(plots.threshold_curves(curves), "samples kept vs threshold") if curves else "<p>No scores.</p>"
    section("thresholds", body, "For each setting that drops on a score: samples kept if it were set to x, every "
            "other setting as it is (what `mifa filter --set` would give; `mifa inspect` prints the tables). "
            "Dashed: the current value.")

    section("lineage", _table(["version", "kind", "finished", "kept / planned", "fingerprint", "path",
                               "filter settings changed vs its parent"], _lineage(folder, manifest)))
    parts.append("</body></html>\n")
    return "".join(parts)


def _curve(scan: ThresholdScan) -> dict[str, Any]:
    finite = scan.values[np.isfinite(scan.values)]
    lo, hi = float(finite.min()), float(finite.max())
    if scan.current is not None:  # the curve runs from the current value to the data
        lo, hi = min(lo, scan.current), max(hi, scan.current)
    pad = (hi - lo) * 0.05 or 0.05
    values = np.unique(np.concatenate([np.linspace(lo - pad, hi + pad, 200), finite]))
    t = scan.threshold
    return {"score": t.score, "setting": t.name, "drops": t.drops, "current": scan.current, "total": scan.total,
            "values": values.tolist(), "kept": [scan.total - scan.dropped(float(v)) for v in values],
            "kept_now": scan.total - scan.dropped(scan.current)}

